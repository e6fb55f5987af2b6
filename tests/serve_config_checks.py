"""Checks shared by the offline tests of the shipped Serve configs (test_manifests.py,
test_serve_settings.py): keys Ray Serve would silently ignore, application args validated
as the app reads them (with the model directories of conftest's `local_pair`)."""
from __future__ import annotations

import copy
import os
import typing

from pydantic import BaseModel

from specserve_ray.config import AppConfig


def nested_model(annotation):
    """(model class, is_list) of the pydantic model inside an annotation such as
    Optional[M], List[M] or Union[Dict, M]; (None, False) when there is none."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        model, many = nested_model(arg)
        if model is not None:
            return model, many or origin in (list, typing.List)
    return None, False


def unknown_serve_keys(model: type[BaseModel], data, where: str) -> list[str]:
    """Keys of `data` that `model` (recursively) does not define: pydantic ignores them."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    by_key = {name: f for name, f in fields.items()}
    by_key.update({f.alias: f for f in fields.values() if f.alias})
    bad = []
    for key, value in data.items():
        field = by_key.get(key)
        if field is None:
            bad.append(f"{where}.{key}")
            continue
        sub, many = nested_model(field.annotation)
        if sub is None:
            continue
        if many and isinstance(value, list):
            for i, item in enumerate(value):
                bad += unknown_serve_keys(sub, item, f"{where}.{key}[{i}]")
        else:
            bad += unknown_serve_keys(sub, value, f"{where}.{key}")
    return bad


def validate_args(args: dict, local_pair, where: str) -> tuple[AppConfig, dict[str, str]]:
    """AppConfig of `args` with explicit model paths swapped for `local_pair`.

    Returns the config and {role: original path}. Those paths must be absolute local
    directories: SpecServe-Ray never downloads, and a relative path would depend on the
    working directory of whichever Ray worker builds the app."""
    assert isinstance(args, dict), f"{where}: args must be a mapping"
    args = copy.deepcopy(args)
    external = {}
    engine = args.get("engine")
    if isinstance(engine, dict):
        for role, local in zip(("target", "draft"), local_pair):
            model = engine.get(role)
            if isinstance(model, dict) and "path" in model:
                path = model["path"]
                assert isinstance(path, str) and os.path.isabs(path), (
                    f"{where}: engine.{role}.path {path!r} must be an absolute local "
                    "directory (a pre-downloaded Hugging Face model), not a Hub id or a "
                    "relative path")
                external[role] = path
                model["path"] = local
    return AppConfig.model_validate(args), external
