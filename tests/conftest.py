import os

# Triton decides at decoration time whether a kernel is compiled or interpreted, so this must be
# set before any kernel module is imported. Without a GPU the kernels run in Triton's interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
