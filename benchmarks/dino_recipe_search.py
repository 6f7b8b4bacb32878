"""DINO recipe search on Fashion-MNIST, in memory (the probes quoted in benchmarks/README.md came from this script).

    python benchmarks/dino_recipe_search.py steps=700 bs=64 lr=4e-3 out_dim=1024 nloc=2 cl=False extra=False koleo=0.05

Each argument is `key=python_literal` (see `cfg` below). Images come straight from Debian's dataset-fashion-mnist
idx files (resized with torch, not PIL, so figures can differ from `hf-ssl train` by a few tenths); the same
DinoForPreTraining, multi-crop views and schedules as the training loop; then the weighted kNN (k=20, T=0.07) of
the teacher backbone on the full splits, and the effective rank of its train features. Prints one JSON line.

`cjs=(b,c,s,h)` sets `color_jitter_strength`. Probe-only options (not in the library): `ratio=(lo,hi)` sets the
random-resized-crop aspect ratios; `sk=True` replaces DINO's centering of the teacher by DINOv2's
Sinkhorn-Knopp normalisation (3 iterations, over this batch); `head={...}` passes extra DinoHeadConfig keys
(e.g. `head='{"norm_last_layer":False}'`).
"""
import sys, time, json, math, torch, torch.nn.functional as F, numpy as np, gzip
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from modeling import DinoConfig, DinoForPreTraining
from modeling.heads import DinoHeadConfig
from modeling.backbones import pooled_features, BACKBONE_PRESETS
from hf_ssl.augment import build_views
from modeling import schedules
from hf_ssl.evaluation import knn_predict
torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
cfg = dict(budget=300, bs=256, lr=5e-4, wd=0.04, wd_end=0.4, m=0.99, tt=0.04, ts=0.1, out_dim=4096, hidden=512, bneck=128,
           gsize=32, gscale=(0.4,1.0), nloc=6, lsize=16, lscale=(0.1,0.4), cj=0.8, gray=0.2, blur=(1.0,0.1), sol=(0.0,0.2), lblur=0.5,
           img=32, cl=True, warm=0.1, backbone="resnet-tiny", bb={}, seed=0, epochs_est=None, steps=None, extra=True, koleo=0.0, sk=False, head={}, cjs=None, ratio=None)
for a in sys.argv[1:]:
    k, v = a.split("=", 1); cfg[k] = eval(v)
def idx(p):
    with gzip.open(p) as f: d = f.read()
    nd = d[3]; dims = [int.from_bytes(d[4+4*i:8+4*i], 'big') for i in range(nd)]
    return np.frombuffer(d, np.uint8, offset=4+4*nd).reshape(dims)
D="/usr/share/datasets/fashion-mnist/"
xtr, ytr = torch.from_numpy(idx(D+"train-images-idx3-ubyte.gz").copy()), torch.from_numpy(idx(D+"train-labels-idx1-ubyte.gz").astype(np.int64))
xte, yte = torch.from_numpy(idx(D+"t10k-images-idx3-ubyte.gz").copy()), torch.from_numpy(idx(D+"t10k-labels-idx1-ubyte.gz").astype(np.int64))
def prep(x):  # [N,28,28] uint8 -> [N,3,S,S] uint8 (bilinear like PIL approx)
    x = x[:, None].float()
    if cfg["img"] != 28: x = F.interpolate(x, size=(cfg["img"],)*2, mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0,255).to(torch.uint8).expand(-1,3,-1,-1).contiguous()
Xtr, Xte = prep(xtr), prep(xte)
if cfg["sk"]:  # probe: DINOv2's Sinkhorn-Knopp teacher targets instead of centering (the center is ignored)
    import modeling.dino.modeling_dino as _md
    @torch.no_grad()
    def _sinkhorn_knopp(t, tt):
        q = torch.exp((t - t.max()) / tt).T; q /= q.sum(); K, B = q.shape  # [K, B]; the max shift cancels out
        for _ in range(3):
            q /= q.sum(1, keepdim=True); q /= K; q /= q.sum(0, keepdim=True); q /= B
        return (q * B).T
    # The library's dino_loss with teacher logits tt·log(q): its softmax((logits - 0) / tt) is then exactly q.
    _library_dino_loss = _md.dino_loss
    _md.dino_loss = lambda s, t, center, ts, tt: _library_dino_loss(
        s, [tt * _sinkhorn_knopp(x, tt).log() for x in t], torch.zeros_like(center), ts, tt)
bbcfg = {**BACKBONE_PRESETS[cfg["backbone"]], **cfg["bb"]}
torch.manual_seed(cfg["seed"])
model = DinoForPreTraining(DinoConfig(backbone_config=bbcfg, head_config=DinoHeadConfig(in_dim=bbcfg["hidden_sizes"][-1] if "hidden_sizes" in bbcfg else bbcfg["hidden_size"], hidden_dim=cfg["hidden"], bottleneck_dim=cfg["bneck"], out_dim=cfg["out_dim"], **cfg["head"]), student_temperature=cfg["ts"], freeze_last_layer_epochs=0, koleo_weight=cfg['koleo'])).train()
if cfg["cl"]: model = model.to(memory_format=torch.channels_last)
if cfg["ratio"] is not None:  # probe: random-resized-crop aspect ratios instead of kornia's (3/4, 4/3)
    import types, kornia.augmentation as _K, hf_ssl.augment as _aug
    _aug.K = types.SimpleNamespace(**{**{n: getattr(_K, n) for n in dir(_K) if not n.startswith("_")},
        "RandomResizedCrop": lambda size, scale: _K.RandomResizedCrop(size, scale=scale, ratio=cfg["ratio"])})
views = build_views("multicrop", (0.5,)*3, (0.5,)*3, global_crop_size=cfg["gsize"], global_crop_scale=cfg["gscale"], num_local_crops=cfg["nloc"], local_crop_size=cfg["lsize"], local_crop_scale=cfg["lscale"], color_jitter_p=cfg["cj"], grayscale_p=cfg["gray"], global_blur_p=cfg["blur"], global_solarize_p=cfg["sol"], local_blur_p=cfg["lblur"], **({} if cfg["cjs"] is None else {"color_jitter_strength": cfg["cjs"]}))
decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]; nodecay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
opt = torch.optim.AdamW([{"params": decay}, {"params": nodecay, "weight_decay": 0.0}], lr=cfg["lr"])
# estimate total steps from a short timing
t0 = time.time(); step = 0; g = torch.Generator().manual_seed(cfg["seed"]); perm = torch.randperm(60000, generator=g); pos = 0
total = None; losses = []
while True:
    el = time.time() - t0
    if cfg["steps"] is not None:
        total = cfg["steps"]
        if step >= total: break
    elif el > cfg["budget"]: break
    if step == 10 and cfg["steps"] is None:
        per = el / 10; total = int(cfg["budget"] / per); print(f"sec/step {per:.3f} -> total ~{total} steps = {total*cfg['bs']/60000:.2f} epochs", flush=True)
    T = total or 10**9
    if pos + cfg["bs"] > 60000: perm = torch.randperm(60000, generator=g); pos = 0
    b = Xtr[perm[pos:pos+cfg["bs"]]]; pos += cfg["bs"]
    lr = schedules.warmup_cosine(step, T, int(cfg["warm"]*T) if total else 10**9, cfg["lr"]*cfg["bs"]/256, 1e-6) if total else cfg["lr"]*cfg["bs"]/256*step/100
    opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr
    opt.param_groups[0]["weight_decay"] = schedules.cosine(step, T, cfg["wd"], cfg["wd_end"])
    v = views(b, step)
    if cfg["cl"]: v = {k: t.contiguous(memory_format=torch.channels_last) for k, t in v.items()}
    out = model(**v, teacher_temperature=cfg["tt"])
    loss = out.loss
    opt.zero_grad(); loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            n = p.grad.norm(); p.grad.mul_(torch.clamp(3.0/(n+1e-6), max=1.0))
    opt.step(); model.post_optimizer_step(schedules.cosine(step, T, cfg["m"], 1.0)); step += 1
    if step % 50 == 0: print(step, round(out.loss.item(), 3), "H", round(out.teacher_entropy.item(), 2), "std", round(out.embedding_std.item(), 4), flush=True)
train_time = time.time() - t0
enc = model.teacher_backbone.eval()
@torch.no_grad()
def feats(X):
    out = []
    for i in range(0, len(X), 1000):
        x = (X[i:i+1000].float()/255 - 0.5)/0.5
        if cfg["cl"]: x = x.contiguous(memory_format=torch.channels_last)
        out.append(F.normalize(pooled_features(enc, x), dim=-1))
    return torch.cat(out)
t1 = time.time(); ftr, fte = feats(Xtr), feats(Xte)
ev = torch.linalg.eigvalsh(torch.cov((ftr-ftr.mean(0)).T)).flip(0).clamp_min(1e-12); ev = ev/ev.sum()
extra0 = {"eff_rank": round(torch.exp(-(ev*ev.log()).sum()).item(), 1)}
acc = (knn_predict(ftr, ytr, fte, 20, 0.07, 10).argmax(1) == yte).float().mean().item()*100
extra = {}
if cfg.get("extra", True):
    enc = model.student_backbone.eval(); fs, fst = feats(Xtr), feats(Xte)
    extra["knn_student"] = round((knn_predict(fs, ytr, fst, 20, 0.07, 10).argmax(1) == yte).float().mean().item()*100, 2)
    enc = model.teacher_backbone
    for mod in enc.modules():
        if isinstance(mod, torch.nn.BatchNorm2d): mod.reset_running_stats(); mod.momentum = None
    enc.train()
    with torch.no_grad():
        for i in range(0, 20000, 1000): pooled_features(enc, (Xtr[i:i+1000].float()/255 - 0.5)/0.5)
    enc.eval(); fr, frt = feats(Xtr), feats(Xte)
    extra["knn_bn_recal"] = round((knn_predict(fr, ytr, frt, 20, 0.07, 10).argmax(1) == yte).float().mean().item()*100, 2)
print(json.dumps({"knn": round(acc, 2), **extra0, **extra, "steps": step, "epochs": round(step*cfg["bs"]/60000, 2), "train_s": round(train_time), "eval_s": round(time.time()-t1), **{k: str(v) for k, v in cfg.items()}}), flush=True)
