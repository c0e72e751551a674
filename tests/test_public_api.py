import subprocess
import sys

import pytest

import proxsparse_hf


@pytest.mark.parametrize("name", proxsparse_hf.__all__)
def test_every_public_name_resolves(name):
    assert getattr(proxsparse_hf, name) is not None
    assert name in dir(proxsparse_hf)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        proxsparse_hf.nope  # noqa: B018


def test_importing_the_package_imports_no_optional_extra():
    """The package needs torch, transformers, huggingface_hub and safetensors only; extras load when used."""
    code = (
        "import sys, proxsparse_hf; "
        "print(','.join(m for m in ('triton', 'lm_eval', 'torchao', 'gguf', 'matplotlib', 'datasets', "
        "'trainer_callbacks') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
