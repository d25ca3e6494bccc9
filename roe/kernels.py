"""Faster matrix products for decode steps on CPU, where the default BLAS is slow.

A roster decode step multiplies the LM head (V x H, the largest matrix of a small model) with
B x K rows. On the CPU measured here (MKL 2024.2 on an AMD EPYC) that product takes 4x longer
for 8 rows than for 1, while oneDNN with a weight packed once takes about 2x: the default
model's head, 8 x 256 x 8192, 2 threads, takes 1.74 ms with MKL and 0.38 ms with oneDNN (1
thread: 1.53 and 0.68 ms). For the small per-layer matrices MKL stays faster, even with cold
caches (oneDNN's fixed cost per call is about 40 us), so only the head is swapped.

``PackedHead`` holds the packed copy (one more head-sized buffer) and installs it on the LM
head for the duration of a step; the model's own forward still does everything around the
product (scaling, soft-capping). Results equal ``F.linear`` up to float rounding (a different
summation order: about 1e-5 on logits of size 10).

``SmallM`` does the same for the per-layer products: MKL takes 2-3x as long for 8 rows as for 1
at these sizes (256 x 256: 30-39 against 15-16 us), though it reads the weight once either way.
Its AVX2 kernel (``small_m.cpp``) reads one weight row into registers and multiplies it with
every row (up to 8, one FMA chain each), so 8 rows cost little more than 1 (17 against 12 us).
Measured with ``benchmarks/small_m_kernel.py``.

The kernel is compiled with ``torch.utils.cpp_extension`` (g++ and ninja, about 40 s) once per
environment: its module name and build folder are keyed on everything the binary depends on
(``Kernel.key``: torch version and include paths, the interpreter and its prefix, the source's
hash, the compiler flags), so two venvs never share or fight over one folder, and alternating
between them never rebuilds. A built kernel is imported directly, without ninja or a lock.
``prepare()`` builds (saying so on stderr) or loads it: ``make install`` runs it
(``python -m roe.kernels``), ``roe bench`` calls it before timing and ``roe serve`` before it
reports ready, so no timed or serving path compiles. Without a compiler or AVX2, or if the build
fails, decode steps keep ``F.linear``. ``RoEConfig(kernels=False)`` (``--no-kernels``) turns both
off: every product is then the model's own.

Both are installed the same way (``_replace_forward``) and checked the same way before use
(``_agrees``: products of 1 to ``MAX_ROWS`` random rows against ``F.linear``).

NOTE: the packed head rests on private torch ops (``torch.ops.mkldnn._reorder_linear_weight``,
``_linear_pointwise``), the small-M kernel on our own build; neither may change a result
silently. An op missing or disagreeing when the kernel is chosen means no kernel; an exception
while decoding, or a weight whose dtype or device changed, means ``F.linear`` from then on, with
a ``RuntimeWarning``; a head weight changed in place or replaced (``.data``, a new Parameter) is
packed again before the next product. A write through ``weight.data`` in place (``.data.copy_``)
bumps no version, as autograd does not see it either: call ``roe.analysis.forget(model)`` or use
``kernels=False`` after one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 8  # rows of a decode step's product the kernels are built and checked for


class PackedHead:
    """The LM head's product through oneDNN with a pre-packed weight; see the module docstring."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear
        self.broken = False  # set once a product raised: F.linear from then on
        self._pack()

    def _pack(self) -> None:
        weight = self.linear.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), MAX_ROWS)
        self.packed_from = _stamp(weight)

    @classmethod
    def for_model(cls, model) -> PackedHead | None:
        """A packed head for ``model``, or None where it does not apply or does not agree.

        Applies to an ``nn.Linear`` head with fp32 weights on CPU when oneDNN is available; its
        products of 1 to ``MAX_ROWS`` random rows must match ``F.linear`` before it is used.
        """
        head = model.get_output_embeddings()
        if type(head) is not torch.nn.Linear or not _fp32_cpu(head.weight) or not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = cls(head)
            agrees = _agrees_on_rows(packed._packed_product, head.weight, head.bias)
        except (RuntimeError, AttributeError, TypeError) as error:  # an op missing from this torch build
            _warn(f"the packed LM head is unavailable ({type(error).__name__}: {error}"[:300] + "); using F.linear")
            return None
        if not agrees:
            _warn("the packed LM head disagrees with F.linear on this torch build; using F.linear")
        return packed if agrees else None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The head's product: packed, or ``F.linear`` where the packed one cannot be trusted."""
        weight, bias = self.linear.weight, self.linear.bias
        if not self.broken and not (_fp32_cpu(weight) and x.dtype == torch.float32):
            self._fail("the head's weight or input is no longer fp32 on CPU")
        if self.broken:
            return F.linear(x, weight, bias)
        try:
            if not _same(_stamp(weight), self.packed_from):  # changed in place or replaced: pack it again
                self._pack()
            return self._packed_product(x)
        except (RuntimeError, AttributeError, TypeError) as error:
            self._fail(f"{type(error).__name__}: {error}"[:300])
            return F.linear(x, weight, bias)

    def _packed_product(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.linear.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fail(self, why: str) -> None:
        self.broken = True
        _warn(f"the packed LM head failed ({why}); using F.linear from now on")

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Route the head's forward through ``product`` inside the block."""
        with ExitStack() as stack:
            _replace_forward(stack, self.linear, self.product)
            yield


KERNEL_FLAGS = ("-O3", "-mavx2", "-mfma")
KERNEL_ROOT = Path.home() / ".cache" / "roe" / "kernels"  # one folder per build key below


@dataclass(frozen=True)
class Kernel:
    """A C++ source compiled once per environment into ``KERNEL_ROOT/<stem>_<key>/`` (see the module docstring)."""

    stem: str  # module name prefix
    source: Path
    functions: tuple[str, ...]
    what: str  # for messages: "roe's decode kernel"
    fallback: str  # what runs without it
    headers: tuple[Path, ...] = ()  # files the source #includes by name ("x.h"), found next to themselves

    def key(self) -> str:
        """A short hash of what the compiled kernel depends on; it names the module and its build folder."""
        from torch.utils.cpp_extension import include_paths

        parts = [torch.__version__, *include_paths(), sys.prefix, sys.version,
                 *(hashlib.sha256(path.read_bytes()).hexdigest() for path in (self.source, *self.headers)),
                 *KERNEL_FLAGS]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def load_or_build(self):
        """The kernel module of this environment: imported if built, else compiled; None on failure."""
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return None
        try:
            name = f"{self.stem}_{self.key()}"
            directory = KERNEL_ROOT / name
            library = directory / f"{name}.so"
            if library.is_file():
                return _import(name, library)
            print(f"roe: compiling {self.what} once for this environment (~40 s)...", file=sys.stderr)
            directory.mkdir(parents=True, exist_ok=True)
            return _compile(name, directory, self)
        except Exception as error:  # no compiler, no ninja, a failed build, an unwritable cache: the fallback
            reason = str(error).strip().splitlines()[-1:] or [""]
            print(f"roe: {self.what} unavailable ({type(error).__name__}: {reason[0][:200]}); using {self.fallback}",
                  file=sys.stderr)
            return None


SMALL_M = Kernel("roe_small_m", Path(__file__).with_name("small_m.cpp"), ("small_m_linear",),
                 "roe's decode kernel", "F.linear")


def prepare() -> bool:
    """Build (once per environment, with a line on stderr) or load the small-M kernel; idempotent.

    Returns whether the kernel is available. Call it before timing or serving, so that the first
    roster with K > 1 never compiles inside a measured step or a request.
    """
    return SmallM.extension() is not None


def _compile(name: str, directory: Path, kernel: Kernel):
    from torch.utils.cpp_extension import load_inline

    return load_inline(name, cpp_sources=kernel.source.read_text(), functions=list(kernel.functions),
                       extra_cflags=list(KERNEL_FLAGS), build_directory=str(directory),
                       extra_include_paths=sorted({str(path.parent) for path in kernel.headers}))


def _import(name: str, library: Path):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SmallM:
    """The model's per-layer ``nn.Linear`` products through the small-M kernel; see the module docstring.

    Applies to fp32 CPU linears without bias whose input width is a multiple of 32 (the lanes of
    four AVX2 registers); other products (more than ``MAX_ROWS`` rows, another dtype, a bias or
    width added later) keep ``F.linear``.
    """

    MAX_ROWS = MAX_ROWS
    _extension = None  # the built module; False once building failed

    def __init__(self, linears: list[torch.nn.Linear], product) -> None:
        self.linears = linears
        self._product = product  # None once a product raised: F.linear from then on

    @classmethod
    def extension(cls):
        """The kernel module of this environment (see ``prepare``); None where it cannot be built."""
        if cls._extension is None:
            cls._extension = SMALL_M.load_or_build() or False
        return cls._extension or None

    @classmethod
    def for_model(cls, model) -> SmallM | None:
        """The kernel for ``model``'s decoder linears, or None where it does not apply or does not agree."""
        head = model.get_output_embeddings()
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head and cls.applies(m)]
        extension = cls.extension() if linears else None
        if extension is None:
            return None
        w = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))
        try:
            agrees = _agrees_on_rows(lambda x: extension.small_m_linear(x, w), w, None)
        except (RuntimeError, TypeError) as error:
            _warn(f"roe's decode kernel failed its check ({error}"[:300] + "); using F.linear")
            return None
        if not agrees:
            _warn("roe's decode kernel disagrees with F.linear in this environment; using F.linear")
        return cls(linears, extension.small_m_linear) if agrees else None

    @staticmethod
    def applies(linear: torch.nn.Linear) -> bool:
        """A linear the kernel computes: fp32 on CPU, no bias, an input width a multiple of 32."""
        return linear.bias is None and _fp32_cpu(linear.weight) and linear.in_features % 32 == 0

    def forward(self, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if (self._product is None or not 1 <= rows.shape[0] <= self.MAX_ROWS or x.dtype != torch.float32
                or not self.applies(linear) or not linear.weight.is_contiguous()):
            return F.linear(x, linear.weight, linear.bias)
        try:
            return self._product(rows.contiguous(), linear.weight).view(*x.shape[:-1], linear.out_features)
        except RuntimeError as error:
            self._product = None
            _warn(f"roe's decode kernel failed ({error}"[:300] + "); using F.linear from now on")
            return F.linear(x, linear.weight, linear.bias)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Route every applicable linear's forward through the kernel inside the block."""
        with ExitStack() as stack:
            for linear in self.linears:
                _replace_forward(stack, linear, lambda x, _linear=linear: self.forward(_linear, x))
            yield


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """A kernel's product matches ``F.linear``'s up to float rounding (relative 1e-4)."""
    return got.shape == want.shape and bool((got - want).abs().max() <= 1e-4 * want.abs().max().clamp(min=1.0))


def _agrees_on_rows(product, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """``product`` equals ``F.linear`` on 1 to ``MAX_ROWS`` random rows (every row block of the kernels)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in range(1, MAX_ROWS + 1):
            x = torch.randn(rows, weight.shape[1], generator=gen)
            if not _agrees(product(x), F.linear(x, weight, bias)):
                return False
    return True


def _fp32_cpu(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def _stamp(weight: torch.Tensor) -> tuple:
    """What a packed copy was made from: the tensor (held, so its id cannot be reused), its
    storage and its in-place version."""
    return weight, weight.data_ptr(), weight._version


def _same(stamp: tuple, other: tuple) -> bool:
    return stamp[0] is other[0] and stamp[1:] == other[1:]


def _warn(message: str) -> None:
    warnings.warn(f"roe: {message}", RuntimeWarning, stacklevel=3)


def _replace_forward(stack: ExitStack, module: torch.nn.Module, forward) -> None:
    """Set ``module.forward`` until ``stack`` closes, then restore any instance forward it had."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    stack.callback(lambda: module.__dict__.pop("forward") if saved is None else setattr(module, "forward", saved))


if __name__ == "__main__":  # python -m roe.kernels: build it now (make install does)
    available = prepare()
    print(f"roe: decode kernel {'ready' if available else 'not available; decode steps use F.linear'}",
          file=sys.stderr)
