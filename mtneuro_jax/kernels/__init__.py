"""Optional native kernels (a layer beside models: models never import this package).

``onednn``: oneDNN convolutions for XLA:CPU as XLA FFI custom calls (``conv_backend='onednn'``).
"""
