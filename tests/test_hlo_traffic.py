"""The bytes an optimised program moves, by kind of operation (ccnet_jax.hlo_traffic)."""

import jax
import jax.numpy as jnp
import pytest

from ccnet_jax.hlo_traffic import Traffic, array_bytes, kind_of, traffic


def test_an_elementwise_fusion_reads_its_operands_and_writes_its_result():
    compiled = jax.jit(lambda x, y: x * 2 + y).lower(jnp.ones((1000,)), jnp.ones((1000,), jnp.bfloat16)).compile()
    # One fusion: reads 4000 + 2000 bytes, writes 1000 float32.
    assert traffic(compiled.as_text()) == {"xla op": Traffic(bytes=10_000, ops=1)}


def test_array_bytes_sums_every_array_of_a_tuple_shape():
    assert array_bytes("(f32[2,3]{1,0}, bf16[4]{0}, pred[], s32[0])") == 24 + 8 + 1 + 0


@pytest.mark.parametrize("op, line, kind", [
    ("custom-call", '%c = (bf16[8,49,49,256]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), '
                    'custom_call_target="__cudnn$convForward"', "cudnn conv"),
    ("custom-call", '%g = f32[64,16]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm"', "gemm"),
    ("fusion", '%gemm_fusion_dot.1 = f32[29222,769]{1,0} fusion(%a, %b), kind=kCustom, '
               'calls=%gemm_fusion_dot.1_computation', "gemm"),
    ("custom-call", '%k = bf16[2,97,97,512]{3,2,1,0} custom-call(%q), custom_call_target="mosaic_gpu_v2"', "kernel"),
    ("fusion", '%f = bf16[2,97,97,256]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_add', "xla op"),
    ("copy", '%copy.1 = bf16[2,97,97,256]{3,2,1,0} copy(%x)', "xla op"),
])
def test_kinds(op, line, kind):
    assert kind_of(op, line) == kind


def test_text_without_an_entry_computation_is_refused():
    with pytest.raises(ValueError, match="compiled.as_text"):
        traffic("HloModule m\n")
