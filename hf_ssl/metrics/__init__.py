"""Local `evaluate` metric scripts, loaded by path (the Hub is unreachable offline): see `hf_ssl.evaluation.load_metric`.

This file only makes the folder a package so that the scripts ship with hf-ssl; the scripts are never imported.
"""
