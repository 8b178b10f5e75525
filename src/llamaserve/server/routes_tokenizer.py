"""vLLM's `GET /tokenizer_info`: what a client needs to use the server's tokenizer remotely.

lm-eval's `tokenizer_backend=remote` reads it (with /tokenize and /detokenize) instead of
downloading the model's tokenizer from the Hugging Face hub: `bos_token` / `eos_token` as text
(it asks /tokenize for their ids), `pad_token`, `chat_template`. The ids, the stop ids and the
context limit are sent as well, so other clients need no second round trip.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llamaserve.server.errors import ApiError, openai_error
from llamaserve.server.state import ServerState


def _token_text(tok, token_id: int | None) -> str | None:
    if token_id is None:  # a tokenizer without BOS
        return None
    names = {i: name for name, i in tok.special_tokens.items()}
    return names.get(token_id) or tok.token_bytes(token_id).decode("utf-8", errors="replace")


def _template_text(tok) -> str | None:
    """The checkpoint's own Jinja chat template; None for the built-in Llama 2/3 formats."""
    source = getattr(getattr(tok, "template", None), "source", None)
    return source if isinstance(source, str) else None


def tokenizer_info(tok, max_model_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": type(tok).__name__,
        "bos_token": _token_text(tok, tok.bos_id),
        "eos_token": _token_text(tok, tok.eos_id),
        "pad_token": None,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "stop_token_ids": sorted(tok.stop_token_ids),
        "chat_template": _template_text(tok),
        "vocab_size": tok.vocab_size,
        "model_max_length": max_model_len,
    }


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/tokenizer_info")
    async def get_tokenizer_info(request: Request) -> Response:
        try:
            state.authenticate(request)
            state.check_ready()
        except ApiError as exc:
            return openai_error(exc)
        return JSONResponse(tokenizer_info(state.tokenizer, state.settings.engine.max_seq_len))

    return router
