"""Light helpers around llama-cpp-python shared by the GGUF target and the benchmark runner (no torch)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def without_extra_buffer_types():
    """Load llama.cpp models with ``use_extra_bufts = False``.

    llama-cpp-python 0.3.36's Llama() offers no argument for it, and on CPUs with AMX the AMX
    repack buffer segfaults on Q4_0 models (seen on this project's machines). The plain CPU buffer
    computes the same results, so we patch the default model params while constructing.
    """
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = original
