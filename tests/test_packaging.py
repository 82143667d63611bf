"""What a user installs: the license file matches the package metadata; the accelerator extras are jax's own."""
import tomllib

from helpers import REPO


def test_the_license_file_is_the_license_the_package_declares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["license"]["text"]
    assert (REPO / "LICENSE").read_text().splitlines()[0] == f"{declared} License"


def test_the_gpu_and_tpu_extras_install_jax_with_its_own_extras():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cuda"] == ["jax[cuda12]"] and extras["cuda13"] == ["jax[cuda13]"] and extras["tpu"] == ["jax[tpu]"]
    readme = (REPO / "README.md").read_text()
    assert '-e ".[cuda]"' in readme and '".[cuda13]"' in readme and '".[tpu]"' in readme
