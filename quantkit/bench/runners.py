"""One runner per runtime: load an artifact, run a prompt through it (prefill) and then one token at a time
(decode) with greedy sampling, as an application would. Runners import only their runtime and numpy (no
torch), because they run in the benchmark's child process, whose memory is what is measured.

Adding a runtime is one class here plus a line in ``RUNNERS``; ``runtime_for`` picks one from an artifact.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import numpy as np


class RunnerError(Exception):
    """The runtime cannot load or run the artifact (reported as bad input, exit 2)."""


class Runner:
    name = ""
    packages: tuple[str, ...] = ()
    device = "cpu"  # where the model computes (quantkit's runtime moves to "cuda" when a GPU is present)

    def __init__(self, path: Path, threads: int, n_ctx: int):
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the KV cache: the next ``prefill`` starts a new sequence."""

    def prefill(self, tokens: list[int]) -> int:
        """Run the prompt; return the greedy next token."""
        raise NotImplementedError

    def step(self, token: int) -> int:
        """Run one token after the sequence so far; return the greedy next token."""
        raise NotImplementedError

    def counters(self) -> dict | None:
        """The runtime's own timing of the last sequence, where it keeps one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @classmethod
    def versions(cls) -> dict[str, str]:
        found = {}
        for package in cls.packages:
            try:
                found[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                found[package] = "not installed"
        return found


class LlamaCppRunner(Runner):
    """llama.cpp through llama-cpp-python: ``Llama.eval`` for the prompt and each decoded token."""

    name = "llama.cpp"
    packages = ("llama-cpp-python",)

    def __init__(self, path: Path, threads: int, n_ctx: int):
        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError:
            raise RunnerError("llama-cpp-python is not installed; pip install 'quantkit[llama]'") from None
        from quantkit.llamacpp import without_extra_buffer_types

        self._lib = llama_cpp
        try:
            with without_extra_buffer_types():
                # flash attention on, as llama.cpp's own tools and server run by default on CPU ("auto");
                # llama-cpp-python leaves it off (measured on SmolLM2: 15 % slower prefill at 512 tokens)
                self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                 n_threads_batch=threads, flash_attn=True, verbose=False, seed=0)
        except ValueError as exc:
            raise RunnerError(f"llama.cpp could not load {path} ({exc})") from None
        self._vocab = self.llm.n_vocab()

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def reset(self) -> None:
        self.llm.reset()  # the next eval drops the cache from position 0
        self._lib.llama_perf_context_reset(self.llm._ctx.ctx)

    def _next(self) -> int:
        # llama.cpp's output buffer holds the last token's logits (Llama.scores is filled only with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab_size,))))

    def prefill(self, tokens: list[int]) -> int:
        self.llm.eval(tokens)
        return self._next()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self._next()

    def counters(self) -> dict:
        """llama.cpp's own counters (``llama_perf_context``) since the last reset: prompt and decode time."""
        perf = self._lib.llama_perf_context(self.llm._ctx.ctx)
        return {"prompt_ms": perf.t_p_eval_ms, "prompt_tokens": perf.n_p_eval,
                "decode_ms": perf.t_eval_ms, "decode_tokens": perf.n_eval}

    def close(self) -> None:
        self.llm.close()


class OnnxRuntimeRunner(Runner):
    """onnxruntime (CPU provider) over quantkit's decoder graph (``.onnx`` or ``.ort``) with its KV cache."""

    name = "onnxruntime"
    packages = ("onnxruntime",)

    def __init__(self, path: Path, threads: int, n_ctx: int):
        try:
            import onnxruntime  # noqa: F401 - fail early with the install hint
        except ImportError:
            raise RunnerError("onnxruntime is not installed; pip install 'quantkit[onnx]'") from None
        from quantkit.onnx_decoder import OnnxDecoder

        try:
            self.decoder = OnnxDecoder(path, threads=threads)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise RunnerError(f"onnxruntime could not load {path} ({str(exc).splitlines()[0]})") from None
        self.cache = None
        self._vocab = None

    @property
    def vocab_size(self) -> int:
        if self._vocab is None:
            logits, _ = self.decoder.forward(np.zeros((1, 1), np.int64))
            self._vocab = logits.shape[-1]
        return self._vocab

    def reset(self) -> None:
        self.cache = None

    def _run(self, ids: list[int]) -> int:
        logits, self.cache = self.decoder.forward(np.asarray([ids], np.int64), self.cache)
        return int(logits[0, -1].argmax())

    def prefill(self, tokens: list[int]) -> int:
        return self._run(tokens)

    def step(self, token: int) -> int:
        return self._run([token])


class OnnxGenaiRunner(Runner):
    """onnxruntime-genai over an onnx-genai folder: its own generator (KV cache, buffers) as an app drives it;
    greedy tokens are read from its logits, so only the search step is quantkit's."""

    name = "onnxruntime-genai"
    packages = ("onnxruntime-genai", "onnxruntime")

    def __init__(self, path: Path, threads: int, n_ctx: int):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise RunnerError("onnxruntime-genai is not installed; pip install 'quantkit[onnx]'") from None
        folder = path.parent if path.is_file() else path
        try:
            config = og.Config(str(folder))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
            self.model = og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises its own error types
            raise RunnerError(f"onnxruntime-genai could not load {folder} ({str(exc).splitlines()[0]})") from None
        from quantkit.targets.onnx_genai import generator_length

        self._og, self.n_ctx, self.generator = og, generator_length(folder, n_ctx), None
        self._vocab = int(json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"])

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def reset(self) -> None:
        self.generator = None

    def _run(self, ids: list[int]) -> int:
        self.generator.append_tokens(np.asarray([ids], np.int32))
        return int(np.asarray(self.generator.get_logits())[0, -1].argmax())

    def prefill(self, tokens: list[int]) -> int:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx, batch_size=1)
        self.generator = self._og.Generator(self.model, params)
        return self._run(tokens)

    def step(self, token: int) -> int:
        return self._run([token])


class TransformersRunner(Runner):
    """transformers on CPU over a Hugging Face folder — the unquantized model, or an hf-gptq / hf-awq checkpoint
    through the quantization backend transformers picks (gptqmodel) — with transformers' own KV cache. This
    child imports torch: its memory is this runtime's, as a server running transformers would hold."""

    name = "transformers"
    packages = ("transformers", "torch", "gptqmodel")

    def __init__(self, path: Path, threads: int, n_ctx: int):
        try:
            import torch
            import transformers  # noqa: F401 - fail early with the install hint
        except ImportError:
            raise RunnerError("transformers is not installed; pip install 'quantkit[hf]'") from None
        if not (path / "config.json").is_file():
            raise RunnerError(f"{path} is not a Hugging Face model folder (no config.json)")
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(threads))
        torch.set_num_threads(threads)
        self._torch = torch
        self.device = "cpu"
        try:
            self.model = self._load(path)
        except (ImportError, OSError, ValueError) as exc:
            raise RunnerError(f"{self.name} could not load {path} ({str(exc).splitlines()[0]})") from None
        self.cache = None

    def _load(self, path: Path):
        from transformers import AutoModelForCausalLM

        from quantkit.targets.hf_checkpoint import fused_experts_split

        # fp32 activations, as quantkit's accuracy check and a CPU deployment run them; quantized experts
        # load one linear each (mixture-of-experts models only)
        with fused_experts_split(path):
            return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=self._torch.float32).eval()

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def reset(self) -> None:
        self.cache = None

    def _run(self, ids: list[int]) -> int:
        with self._torch.no_grad():
            out = self.model(input_ids=self._torch.tensor([ids], device=self.device), past_key_values=self.cache,
                             use_cache=True)
        self.cache = out.past_key_values
        return int(out.logits[0, -1].argmax())  # .item() waits for the GPU: each step is timed whole

    def prefill(self, tokens: list[int]) -> int:
        return self._run(tokens)

    def step(self, token: int) -> int:
        return self._run([token])


class SequenceRunner(Runner):
    """A runtime fed the whole sequence so far (or, with a KV cache, only its new tokens) by ``_forward``, which
    returns the logits after them; greedy prefill and steps follow from it. A model of fixed length (no KV cache)
    sets ``length``, and a workload longer than it is refused."""

    tokens: list[int]
    _vocab: int | None = None

    def _forward(self, tokens: list[int]):
        """Logits after ``tokens``, which extend ``self.tokens``."""
        raise NotImplementedError

    @staticmethod
    def _check_fits(path: Path, length: int, n_ctx: int) -> None:
        if n_ctx - 1 > length:
            raise RunnerError(f"{path.name} runs sequences of exactly {length} tokens (no KV cache); "
                              "--prompt-tokens plus --gen-tokens must stay within it")

    @property
    def vocab_size(self) -> int:
        if self._vocab is None:
            self._vocab = int(self._forward([0]).shape[-1])
            self.tokens = []
        return self._vocab

    def reset(self) -> None:
        self.tokens = []

    def prefill(self, tokens: list[int]) -> int:
        self.tokens = []
        return int(self._forward(list(tokens)).argmax())

    def step(self, token: int) -> int:
        return int(self._forward([token]).argmax())


class ExecuTorchRunner(SequenceRunner):
    """The ExecuTorch runtime over a ``.pte``. A KV-cache program (``forward(tokens, input_pos)``) prefills the
    prompt in one call and then runs one token per call. A full-sequence program (families without a KV-cache
    program) has no cache, so every decode step re-runs the program over the whole sequence so far (padded to
    its fixed length; causal attention keeps the padding out of the positions read)."""

    name = "executorch"
    packages = ("executorch",)

    def __init__(self, path: Path, threads: int, n_ctx: int):
        try:
            import executorch.runtime  # noqa: F401 - fail early with the install hint
            import torch
        except ImportError:
            raise RunnerError("the ExecuTorch runtime is not installed; pip install 'quantkit[executorch]'") from None
        from quantkit.targets.executorch import has_kv_cache, load_forward

        torch.set_num_threads(threads)
        self._torch = torch
        try:
            self.method = load_forward(path)  # the same loading (and delegate warm-up) as the accuracy check
        except Exception as exc:  # the runtime raises its own error types for unreadable programs
            raise RunnerError(f"the ExecuTorch runtime could not load {path} ({str(exc).splitlines()[0]})") from None
        self.kv_cache = has_kv_cache(self.method)
        if not self.kv_cache:
            self.length = int(tuple(self.method.metadata.input_tensor_meta(0).sizes())[-1])
            self._check_fits(path, self.length, n_ctx)
        self.tokens = []

    def _forward(self, tokens: list[int]):
        """Logits after ``tokens``, which extend ``self.tokens`` (a KV-cache program computes only them)."""
        torch = self._torch
        if self.kv_cache:
            start = len(self.tokens)
            self.tokens += tokens
            ids = torch.tensor([tokens], dtype=torch.long)
            return self.method.execute([ids, torch.tensor([start], dtype=torch.long)])[0][0, -1]
        self.tokens += tokens
        ids = torch.zeros((1, self.length), dtype=torch.long)
        ids[0, : len(self.tokens)] = torch.tensor(self.tokens)
        return self.method.execute([ids])[0][0, len(self.tokens) - 1]


class LiteRTRunner(SequenceRunner):
    """LiteRT's interpreter over a ``.tflite`` full-sequence model (quantkit's tflite target has no KV cache): every
    decode step re-runs the model over the whole sequence so far, padded to its fixed length (causal attention keeps
    the padding out of the positions read)."""

    name = "litert"
    packages = ("ai-edge-litert",)

    def __init__(self, path: Path, threads: int, n_ctx: int):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise RunnerError("LiteRT is not installed; pip install 'quantkit[litert]'") from None
        try:
            self.runner = Interpreter(model_path=str(model_file(path)), num_threads=threads).get_signature_runner()
        except (ValueError, RuntimeError) as exc:
            raise RunnerError(f"LiteRT could not load {path} ({str(exc).splitlines()[0]})") from None
        self.input, details = next(iter(self.runner.get_input_details().items()))
        self.length = int(details["shape"][1])
        self._check_fits(path, self.length, n_ctx)
        self.tokens = []

    def _forward(self, tokens: list[int]) -> np.ndarray:
        self.tokens += tokens
        ids = np.zeros((1, self.length), dtype=np.int32)
        ids[0, : len(self.tokens)] = self.tokens
        return next(iter(self.runner(**{self.input: ids}).values()))[0, len(self.tokens) - 1]


class QuantkitRunner(TransformersRunner):
    """quantkit's own runtime over an hf-gptq / hf-awq folder: transformers' model with quantkit's QuantLinear
    layers (the Triton kernels on a GPU, their torch reference on a CPU). Chosen with ``--runtime quantkit``."""

    name = "quantkit"
    packages = ("torch", "transformers", "triton")

    def _load(self, path: Path):
        from quantkit.errors import QuantkitError
        from quantkit.kernels.quant_linear import load_quantized_model

        # on a GPU: fp16 activations through the Triton kernels, as a GPU deployment runs them (never run here:
        # no GPU was lent to this project yet); on a CPU: fp32 through their torch reference
        if self._torch.cuda.is_available():
            self.device = "cuda"
        dtype = self._torch.float16 if self.device == "cuda" else self._torch.float32
        try:
            return load_quantized_model(path, dtype=dtype).to(self.device)
        except QuantkitError as exc:
            raise ValueError(str(exc)) from None


RUNNERS: dict[str, type[Runner]] = {r.name: r for r in (LlamaCppRunner, OnnxRuntimeRunner, OnnxGenaiRunner,
                                                        TransformersRunner, QuantkitRunner, ExecuTorchRunner,
                                                        LiteRTRunner)}


def model_file(path: Path) -> Path:
    """The file a runtime opens for an artifact path (a folder artifact holds one model file)."""
    if path.is_dir():
        for candidate in ("model.onnx", "model.ort", "model.pte", "model.tflite"):
            if (path / candidate).is_file():
                return path / candidate
    return path


def runtime_for(path: Path) -> str:
    """The runtime that loads an artifact, from its file type."""
    if path.is_dir() and (path / "genai_config.json").is_file():
        return "onnxruntime-genai"
    suffix = model_file(path).suffix
    by_suffix = {".gguf": "llama.cpp", ".onnx": "onnxruntime", ".ort": "onnxruntime", ".pte": "executorch",
                 ".tflite": "litert"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    if path.is_dir() and (path / "config.json").is_file():
        return "transformers"  # an hf-gptq / hf-awq checkpoint, or the unquantized model folder
    raise RunnerError(f"no runtime loads {path}: expected a .gguf file, an ONNX/ORT, ExecuTorch or LiteRT folder, "
                      "a .pte program, a .tflite model, a Hugging Face folder, a manifest.json or a quantkit output "
                      "folder")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
