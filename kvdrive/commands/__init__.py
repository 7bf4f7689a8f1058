"""The ``kvdrive`` commands, one module each (``add_parser`` and ``run``); ``kvdrive.cli`` lists
them. ``common`` holds the options shared by the commands that load a model."""

__all__ = ["common", "demo", "eval", "generate", "info", "probe"]
