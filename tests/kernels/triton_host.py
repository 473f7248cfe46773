"""Run kernels.triton_fa2 launch plans in triton's interpreter on numpy arrays, without torch.

Triton's interpreter (triton/runtime/interpreter.py, GridExecutor) expects torch-like tensors: it
reads `data_ptr()`, `dtype`, `untyped_storage()` (with its own `data_ptr()`, `cpu()`, `copy_()`),
`new_empty(0, device=...)`, `set_(storage, offset, size, stride)`, `storage_offset()`, `size()` and
`stride()`, copies each storage "to the host" and back around the launch, and maps `str(dtype)`
to a triton type. `HostTensor` answers all of that over one numpy array whose memory the
interpreted kernel reads and writes in place (the "host copy" is the array itself).

bfloat16: numpy arrays of ml_dtypes.bfloat16 map to triton's bf16 (stored as uint16 bits in the
interpreter), and loads, stores and casts are exact. The interpreter's tl.dot however multiplies
the raw uint16 bit patterns of bf16 operands (triton-lang/triton#11584, "not supported yet");
`launch` fixes that for its duration by converting bf16 dot operands to float32 first, which is
what a GPU tensor core computes (exact bf16 products, float32 sums).

triton.jit reads TRITON_INTERPRET when it decorates a function, triton's own tl.zeros, tl.max, ...
included, so the variable must be 1 before triton is first imported; then the process cannot also
compile kernels for jax-triton (see `interpreter_ready`).
"""

import contextlib

import jax.numpy as jnp
import numpy as np

from kernels.triton_fa2.common import LaunchPlan


class _Storage:
    def __init__(self, array):
        self.array = array

    def data_ptr(self):
        return self.array.ctypes.data

    def cpu(self):
        return self  # already host memory: the kernel works on the array itself

    def copy_(self, other):
        assert other.data_ptr() == self.data_ptr()  # same memory: nothing to copy


class HostTensor:
    """The torch.Tensor surface triton's interpreter touches, over a C-contiguous numpy array."""

    def __init__(self, array):
        self.array = array

    @property
    def dtype(self):
        return self.array.dtype  # str() is e.g. 'bfloat16', which triton maps to bf16

    @property
    def shape(self):
        return self.array.shape

    def data_ptr(self):
        return self.array.ctypes.data

    def untyped_storage(self):
        return _Storage(self.array)

    def new_empty(self, *sizes, device=None):
        del device
        return HostTensor(np.empty(sizes, self.array.dtype))

    def set_(self, storage, offset, size, stride):
        assert offset == 0 and tuple(size) == storage.array.shape
        self.array = storage.array
        return self

    def storage_offset(self):
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)


def interpreter_ready() -> bool:
    """Whether triton.jit turns functions into interpreted ones in this process: TRITON_INTERPRET
    was 1 when triton was first imported (its own tl.zeros, tl.max, ... are @jit functions too,
    so setting the variable later leaves a mix the interpreter cannot run)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@contextlib.contextmanager
def _bf16_dots():
    """Make the interpreter's tl.dot read bf16 operands as values, not as uint16 bits."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def as_float32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(data.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *precision):
        return original(self, as_float32(a), as_float32(b), d, *precision)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = original


def launch(plan: LaunchPlan, arrays) -> tuple:
    """Run one plan on numpy arrays (a drop-in for kernels.triton_fa2.common.jax_triton_launch).
    Outputs start as NaN, so any element a kernel fails to write shows up in the comparison."""
    from kernels.triton_fa2 import kernels as triton_kernels

    if not interpreter_ready():
        raise RuntimeError(
            "triton_host.launch needs TRITON_INTERPRET=1 set before triton is first imported."
        )
    kernel = getattr(triton_kernels, plan.kernel)
    dummy = np.zeros((1,), np.int32)  # segment ids the kernel never reads
    inputs = [
        HostTensor(dummy if arrays[name] is None else np.ascontiguousarray(arrays[name]))
        for name in plan.inputs
    ]
    outputs = [np.full(shape, np.nan, jnp.dtype(dtype)) for _, shape, dtype in plan.outputs]
    with _bf16_dots():
        kernel[plan.grid](
            *inputs,
            *plan.scalars,
            *map(HostTensor, outputs),
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
            **plan.constexprs,
        )
    return tuple(outputs)
