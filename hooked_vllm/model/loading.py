"""Where a model comes from, checked before anything loads: the shipped demo, a checkpoint folder, or
a hub id (from the local Hugging Face cache, or the hub when it can be reached).

Hugging Face's own loaders retry an unreachable hub for half a minute and end in a long traceback;
here an unreachable hub is found with one short connection attempt, and every source that cannot be
loaded is one :class:`~hooked_vllm.errors.ModelNotFoundError` naming what was looked for.

Example:
    >>> source = resolve_source("demo")
    >>> (source.path / "config.json").is_file()
    True
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hooked_vllm.demo import demo_model_dir, demo_phases_model_dir
from hooked_vllm.errors import ModelNotFoundError

#: the name of the demo model shipped with the package (``HookedVLM.from_pretrained("demo")``)
DEMO = "demo"
#: the name of the 16-layer demo model trained in three stages, the main job's default
DEMO_PHASES = "demo-phases"
#: the shipped models by name, and where each is
SHIPPED = {DEMO: demo_model_dir, DEMO_PHASES: demo_phases_model_dir}
#: seconds one connection attempt to the hub may take before it counts as unreachable
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` loads: a folder, or a hub id with the keywords HF needs for it."""

    name: str
    path: Path | None = None
    hf_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """What HF's ``from_pretrained`` is given: the folder, or the hub id."""
        return str(self.path) if self.path is not None else self.name


def resolve_source(name_or_path: str, *, probe_hub: bool = True) -> ModelSource:
    """The source of ``name_or_path``, or a one-line :class:`ModelNotFoundError` saying why not.

    ``"demo"`` and ``"demo-phases"`` are the shipped demo models (a folder named ``demo`` is
    ``"./demo"``). A folder must hold
    a readable ``config.json``. Anything else is a hub id: taken from the local Hugging Face cache
    when it is there (offline, without retries, when the hub cannot be reached), downloaded by HF when
    the hub can be reached, refused at once otherwise.
    """
    if name_or_path in SHIPPED:
        try:
            return ModelSource(name_or_path, SHIPPED[name_or_path]())
        except FileNotFoundError as exc:
            raise ModelNotFoundError(str(exc)) from None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_checkpoint_folder(path)
        return ModelSource(name_or_path, path.resolve())
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(
            f"{name_or_path}: no such model folder. Give a folder holding config.json and the weights "
            "(as save_pretrained writes it), a hub id such as llava-hf/llava-1.5-7b-hf, 'demo' or "
            "'demo-phases'."
        )
    return _hub_source(name_or_path, probe_hub=probe_hub)


def check_checkpoint_folder(path: Path) -> None:
    """``path`` holds a checkpoint's ``config.json`` that parses and names its architecture."""
    config = path / "config.json"
    if not config.is_file():
        contents = sorted(p.name for p in path.iterdir())[:5]
        held = f"it holds {', '.join(contents)}" if contents else "it is empty"
        raise ModelNotFoundError(
            f"{path} is not a checkpoint folder: it has no config.json ({held}). Give the folder a model "
            "was saved to with save_pretrained (config.json, weights, processor files)."
        )
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(
            f"{config} is not valid JSON ({exc}). Restore the checkpoint's config.json."
        ) from None


def _hub_source(repo_id: str, *, probe_hub: bool) -> ModelSource:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        if constants.HF_HUB_OFFLINE or (probe_hub and not hub_reachable()):
            return ModelSource(repo_id, hf_kwargs={"local_files_only": True})
        return ModelSource(repo_id)
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif probe_hub and not hub_reachable():
        why = f"the hub ({_hub_host()[0]}) cannot be reached"
    else:
        return ModelSource(repo_id)
    raise ModelNotFoundError(
        f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. "
        "Download it where there is network (huggingface-cli download "
        f"{repo_id}) and pass the folder, or point HF_HOME at a cache that holds it."
    )


def _hub_host() -> tuple[str, int]:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether one TCP connection to the hub opens within ``timeout_s`` (name lookup included, which
    ``socket``'s own timeout does not bound: it runs in a thread that is given up on)."""
    host, port = _hub_host()
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # the proxy decides; let HF try
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])
