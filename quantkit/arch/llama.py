"""Llama and Mistral: the dense decoder every other family is described against."""

from quantkit.arch.base import Architecture

LLAMA = Architecture(name="llama", hf_class="LlamaForCausalLM", gguf_arch="llama")
# Mistral's checkpoints are Llama's layout (its sliding window is a config value the runtimes read)
MISTRAL = Architecture(name="mistral", hf_class="MistralForCausalLM", gguf_arch="llama")

FAMILIES = (LLAMA, MISTRAL)
