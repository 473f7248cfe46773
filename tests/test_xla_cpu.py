import jax
import jax.numpy as jnp
import pytest

from patchdiff import xla_cpu


def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_cpu_programs_leave_convolutions_to_eigen():
    if not xla_cpu._accepted():  # another jaxlib: a warning was logged, jax's defaults kept
        pytest.skip("this XLA does not take the YNN fusion option")
    assert xla_cpu.compiler_options() == xla_cpu.CPU_OPTIONS
    x, w = jnp.ones((8, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
    grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
    hlo = xla_cpu.jit(grad).lower(x, w).compile().as_text()
    library = [line for line in hlo.splitlines() if "__ynn_fusion" in line]
    assert not [line for line in library if "conv_general_dilated" in line], library
    assert "convolution(" in hlo  # the three convolutions stay XLA's own (Eigen)
    a, b = xla_cpu.jit(grad)(x, w), jax.jit(grad)(x, w)
    for ours, default in zip(a, b, strict=True):
        assert jnp.allclose(ours, default, rtol=1e-5)


def test_a_users_own_choice_in_xla_flags_wins(monkeypatch):
    flags = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert xla_cpu.compiler_options() is None


def test_jit_works_bare_and_with_arguments():
    @xla_cpu.jit
    def double(x):
        return 2 * x

    @xla_cpu.jit(static_argnums=1)
    def power(x, k):
        return x**k

    assert float(double(jnp.float32(3))) == 6
    assert float(power(jnp.float32(3), 2)) == 9
