"""The job spec: which manifest, which model, where the output goes, defaults, stage layout and S3 settings."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, SecretStr, SerializationInfo, ValidationError, field_serializer, field_validator,
    model_validator,
)

from schemas.errors import UserError
from schemas.manifest import GenerationDefaults

__all__ = ["GenerationDefaults", "JobSpec", "S3Settings", "StageActors", "StageLayout", "SECRET_MASK"]

# What a secret becomes in a dump; loading it back means "not set", so a dumped spec never carries a fake secret.
SECRET_MASK = "**********"
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class S3Settings(BaseModel):
    """How to reach S3-compatible storage. Every field left None falls back to the standard AWS environment
    (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`).

    Secrets dump as a mask (or as the value only with `model_dump(context={"reveal_secrets": True})`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    # "path" for MinIO-style servers; "virtual" for Huawei OBS and AWS; "auto" lets botocore decide.
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    max_attempts: int = Field(5, ge=1, le=20)
    # "legacy" (botocore's default) does not retry SlowDown.
    retry_mode: Literal["standard", "adaptive"] = "standard"
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)

    @field_validator("access_key_id", "secret_access_key", "session_token", mode="before")
    @classmethod
    def _mask_means_unset(cls, value: Any) -> Any:
        return None if value == SECRET_MASK or value == "" else value

    @field_serializer("access_key_id", "secret_access_key", "session_token", when_used="always")
    def _dump_secret(self, value: SecretStr | None, info: SerializationInfo) -> str | None:
        if value is None:
            return None
        if info.context and info.context.get("reveal_secrets"):
            return value.get_secret_value()
        return SECRET_MASK


class StageActors(BaseModel):
    """Actors per pipeline stage; None lets the driver choose from measured stage times."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encode: int | None = Field(None, ge=1)
    structure: int | None = Field(None, ge=1)
    fusion: int | None = Field(None, ge=1)
    texture: int | None = Field(None, ge=1)
    decode: int | None = Field(None, ge=1)

    def chosen(self) -> dict[str, int]:
        """The stages whose actor count was set by hand."""
        return {name: n for name, n in self.model_dump().items() if n is not None}


class StageLayout(BaseModel):
    """Where the stages run and how their output is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["cpu", "npu"] = "cpu"
    actors: StageActors = StageActors()
    batch_size: int = Field(4, ge=1, le=256)
    image_format: Literal["png", "jpeg", "webp"] = "png"
    # Quality of jpeg and webp (ignored for png, which is lossless).
    quality: int = Field(95, ge=1, le=100)

    @property
    def image_extension(self) -> str:
        return {"png": "png", "jpeg": "jpg", "webp": "webp"}[self.image_format]


def _manifest_stem(manifest: str) -> str:
    name = PurePosixPath(manifest.rstrip("/").replace("\\", "/")).name
    name = name[: -len(".parquet")] if name.endswith(".parquet") else name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-")[:40]
    return stem or "job"


class JobSpec(BaseModel):
    """One batch generation job. `job_id` and `output` are derived when not given, so rerunning the same spec
    resumes the same output."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(min_length=1, description="URI of one Parquet file or a prefix of Parquet files")
    output: str | None = Field(None, description="output URI; default ./outputs/<job_id>")
    job_id: str | None = None
    model: str | None = Field(None, description="model directory path or URI; None = the shipped default")
    defaults: GenerationDefaults = GenerationDefaults()
    stages: StageLayout = StageLayout()
    s3: S3Settings = S3Settings()

    @field_validator("job_id")
    @classmethod
    def _check_job_id(cls, value: str | None) -> str | None:
        if value is not None and (not _JOB_ID.fullmatch(value) or ".." in value):
            raise ValueError("expected 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _fill_derived(self) -> "JobSpec":
        if self.job_id is None:
            self.job_id = f"{_manifest_stem(self.manifest)}-{self.fingerprint()[:10]}"
        if self.output is None:
            self.output = f"./outputs/{self.job_id}"
        return self

    def fingerprint(self) -> str:
        """sha256 of what decides the images: manifest URI, model, defaults and image encoding.

        Stage layout (actors, batch size, device) and storage settings are left out: changing them resumes.
        """
        relevant = {
            "manifest": self.manifest,
            "model": self.model,
            "defaults": self.defaults.model_dump(mode="json"),
            "image_format": self.stages.image_format,
            "quality": self.stages.quality if self.stages.image_format != "png" else None,
        }
        canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def job_json(self) -> dict[str, Any]:
        """The spec as written to job.json: JSON types, secrets masked."""
        return self.model_dump(mode="json")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "JobSpec":
        """Load a YAML or JSON spec; `overrides` (e.g. from command-line flags) replace top-level keys.

        Raises UserError naming the file and each wrong field.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read job spec {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"job spec {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                            f"{exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"job spec {path}: expected a mapping of fields at the top level, got {type(data).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "job spec") -> "JobSpec":
        """Validate a spec mapping; UserError names `source` and each wrong field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise UserError(f"{source}: " + describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per error: `field 'a.b': <what was wrong> (got <value>)`; secret values are never shown."""
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
        msg = error["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if error["type"] == "missing":
            lines.append(f"field '{loc}': required, not given")
            continue
        if error["type"] == "extra_forbidden":
            lines.append(f"field '{loc}': not a known field (check its spelling)")
            continue
        shown = "" if any(s in loc for s in ("secret", "access_key", "session_token")) \
            else f" (got {error.get('input')!r:.60})"
        lines.append(f"field '{loc}': {msg}{shown}")
    return "; ".join(lines)
