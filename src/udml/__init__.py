"""udml: unsupervised deep metric learning (UDML-SS) for image retrieval without labels."""
__version__ = "0.1.0"
