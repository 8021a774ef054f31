"""A process that saves versions 1, 2, 3, ... of one session in a loop until it is killed.

The child process of the SIGKILL test in tests/files/test_sessions.py:

    python tests/support/killed_session.py MODEL_DIR TEMPLATE_FILE SESSION_FILE READY_FILE

It continues from the version SESSION_FILE holds (if any), touches READY_FILE once its first save is done,
and saves `version_conversation(model, v)` with extra {"version": v} for v = 1, 2, ... for ever.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp

from streamjax.files import chat_models, sessions
from streamjax.stream import chat

WINDOW = 20_000  # a cache of a few MB, so that a kill often lands inside a write


def version_conversation(model: chat.ChatModel, version: int) -> chat.Conversation:
    """Version `version` of the session: every cache array filled with `version`, one user message naming it."""
    cache = chat.new_conversation(model, 2, WINDOW).cache
    cache = jax.tree.map(lambda leaf: jnp.full_like(leaf, version), cache)
    return chat.Conversation(cache, [{"role": "user", "content": f"version {version}"}], f"reply {version}")


def main(model_dir: str, template: str, session: str, ready: str) -> None:
    model = chat_models.load_chat_model(model_dir, template_file=template)
    path = pathlib.Path(session)
    version = sessions.load_conversation(path, model)[1]["version"] if path.exists() else 0
    while True:
        version += 1
        sessions.save_conversation(path, model, version_conversation(model, version), {"version": version})
        pathlib.Path(ready).touch()


if __name__ == "__main__":
    main(*sys.argv[1:])
