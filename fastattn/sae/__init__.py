"""Sparse autoencoders (SPEC §5): TopK SAE and Binarized Autoencoder on fused kernels,
training over activation stores, entropy estimation, statistics and a 1-bit codec.

Needs only torch and numpy to import; safetensors, tqdm and matplotlib load when used.
"""
from fastattn.ops.sae import (  # noqa: F401
    BinaryCode,
    TopK,
    binary_covariance_penalty,
    binary_encode,
    sparse_decode,
    topk_encode,
)
from fastattn.reference.sae import pack_bits, unpack_bits  # noqa: F401
from fastattn.sae.entropy import (  # noqa: F401
    binary_entropy_bits,
    estimate_entropy_bits,
    random_direction_data,
)
from fastattn.sae.modules import BAEOutput, BinaryAutoencoder, TopKSAE, TopKSAEOutput, fvu  # noqa: F401
