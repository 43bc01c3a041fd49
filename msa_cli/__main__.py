"""`python -m msa_cli`: what torchrun runs (`torchrun --nproc-per-node N -m msa_cli ingest ...`)."""

from .cli import main

main()
