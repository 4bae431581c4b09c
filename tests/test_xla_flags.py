"""Tests for etbert_jax.xla_flags: how defaults merge into XLA_FLAGS, and that XLA applies them."""

import jax
import jax.numpy as jnp

import etbert_jax
from etbert_jax import xla_flags

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_merge_appends_missing_default():
    merged = xla_flags.merge_default_flags("--xla_force_host_platform_device_count=8")
    assert merged.split() == ["--xla_force_host_platform_device_count=8", f"{YNN_FLAG}=-reduce"]


def test_merge_keeps_user_value():
    user = f"{YNN_FLAG}=individual_dot,individual_convolution,reduce --xla_dump_to=/tmp/x"
    assert xla_flags.merge_default_flags(user) == user


def test_merge_of_unset_flags():
    assert xla_flags.merge_default_flags(None) == f"{YNN_FLAG}=-reduce"
    assert xla_flags.merge_default_flags("") == f"{YNN_FLAG}=-reduce"


def test_merge_matches_whole_flag_names():
    longer = f"{YNN_FLAG}_other=1"
    assert xla_flags.merge_default_flags(longer).split() == [longer, f"{YNN_FLAG}=-reduce"]


def test_apply_only_for_verified_jaxlib(monkeypatch):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    monkeypatch.setattr(xla_flags, "_installed_jaxlib_version", lambda: "0.0.1")
    xla_flags.apply_default_xla_flags(environ)
    assert environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"

    monkeypatch.setattr(xla_flags, "_installed_jaxlib_version", lambda: xla_flags.VERIFIED_JAXLIB_VERSION)
    xla_flags.apply_default_xla_flags(environ)
    assert environ["XLA_FLAGS"].split()[-1] == f"{YNN_FLAG}=-reduce"


def test_installed_jaxlib_is_verified_version():
    # The pinned jaxlib must be the one the defaults were checked with, or they are silently skipped.
    assert xla_flags._installed_jaxlib_version() == xla_flags.VERIFIED_JAXLIB_VERSION


def test_compiled_reduction_avoids_ynnpack():
    # conftest.py sets XLA_FLAGS before JAX starts, and importing etbert_jax adds the default.
    assert etbert_jax.__version__
    compiled = jax.jit(lambda x: x.sum(axis=0)).lower(jnp.ones((64, 128), jnp.float32)).compile()
    assert "__ynn_fusion" not in compiled.as_text()
