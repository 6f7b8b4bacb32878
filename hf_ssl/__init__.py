"""hf-ssl: self-supervised pretraining of image encoders, native to the Hugging Face ecosystem."""

__version__ = "0.1.0"
