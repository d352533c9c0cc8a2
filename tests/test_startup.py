"""What a user waits for before a model runs: `hooked-vllm --help`, a mistyped flag and a model source
that cannot be loaded import none of the heavy libraries (the times are in BENCHMARKS.md; these tests
check the cause, the imports, not a timing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("torch", "transformers", "transformer_lens", "datasets", "pyarrow", "matplotlib", "plotly")


def _imported_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True, timeout=300
    )
    return set(done.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import hooked_vllm",
        "from hooked_vllm import HookedVLMError, ModelNotFoundError",
        "from hooked_vllm.cli import build_parser; build_parser()",
    ],
)
def test_the_package_root_and_the_command_line_parser_import_nothing_heavy(code):
    loaded = _imported_after(code)
    assert not {name for name in HEAVY if name in loaded}


def test_checking_a_model_source_imports_neither_torch_nor_transformer_lens(tmp_path):
    loaded = _imported_after(
        "from hooked_vllm.model.loading import resolve_source\n"
        "try:\n"
        f"    resolve_source({str(tmp_path)!r})\n"
        "except Exception as error:\n"
        "    assert type(error).__name__ == 'ModelNotFoundError', error\n"
    )
    assert not {"torch", "transformer_lens", "transformers"} & loaded


def test_help_and_a_mistyped_flag_answer_in_one_line_with_exit_codes():
    run = [sys.executable, "-m", "hooked_vllm.cli"]
    done = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "phase-diagram" in done.stdout and "cache-activations" in done.stdout
    done = subprocess.run(
        [*run, "phase-diagram", "--bogus"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--bogus" in done.stderr


def test_the_public_names_load_on_first_use():
    import hooked_vllm

    assert hooked_vllm.HookedVLM.__name__ == "HookedVLM"
    assert set(hooked_vllm.__all__) <= set(dir(hooked_vllm))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hooked_vllm.nope  # noqa: B018
