"""The default model: fetched on first use (placeholder until the download is implemented)."""


def default_model() -> str:
    raise FileNotFoundError("no model given: pass -m DIR (a directory made by `npllama convert`)")
