"""Triton kernels for MSA routing (stage 2) and router-layer memory attention (stage 3).

Each kernel has a plain torch reference; the dispatch functions use Triton for GPU tensors (or
anywhere with MSA_KERNELS=triton, e.g. under TRITON_INTERPRET=1) and the reference otherwise.
Triton itself is imported only then, with the kernels (triton_routing.py, triton_memory_attention.py): the
package and the CPU path work without it (pyproject installs it on Linux only).
The package is `msa_kernels`, not `kernels`: Hugging Face publishes a distribution of that name that
transformers imports, and a `kernels/` folder in the working directory would shadow it.
"""

from .memory_attention import memory_attention, memory_attention_torch, memory_attention_triton
from .routing import route_scores, route_scores_torch, route_scores_triton

__all__ = [
    "memory_attention",
    "memory_attention_torch",
    "memory_attention_triton",
    "route_scores",
    "route_scores_torch",
    "route_scores_triton",
]
