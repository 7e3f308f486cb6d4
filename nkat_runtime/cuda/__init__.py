"""The CUDA path: Triton kernels that read GGUF blocks as they lie in the file (``dequant.py``,
``kernels.py``) and the torch operator that picks one per shape (``ops.py``).

Nothing here needs a GPU to import except through triton; the CPU path never imports it."""

#: ``load_model``'s / ``--kernels`` choices
KERNELS = ("auto", "triton", "cpu")
