"""The Gradio page: upload images, chat in turns, answers streamed; stop / regenerate / clear;
generation settings; the answer's boxes drawn on the latest image next to the chat.

Every answer comes from `InferenceSession.stream` (the prompt is rendered by the session, as in
training). Gradio's queue runs one generation at a time (`default_concurrency_limit=1`): other
users wait their turn instead of interleaving on one model. A user mistake or a failing generation
becomes a `gr.Error` message in the page; the server goes on serving.
"""

from __future__ import annotations

import logging

import gradio as gr

from runtime.inference import InferenceSession
from runtime.web.chat import (
    MAX_NEW_TOKENS,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
    ChatInputError,
    checked_images,
    grounding,
    session_inputs,
    settings_from,
    user_turn,
)

logger = logging.getLogger(__name__)

TITLE = "Qwen VLM chat"
HELP = (
    "Attach one or more images with the clip, ask in English or Chinese (用中文提问也可以). "
    "Boxes in an answer (`<ref>…</ref><box>(x1,y1),(x2,y2)</box>`, 0-1000 grid) are drawn on the "
    "latest image."
)


def display(turns: list[dict]) -> list[dict]:
    """Chatbot messages: a user turn's images (one message each), then its text."""
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": {"path": p}} for p in turn.get("images", [])]
        messages.append({"role": turn["role"], "content": turn["text"]})
    return messages


def unlock():
    return gr.MultimodalTextbox(interactive=True)


def reset():
    """An empty conversation: chat, turns, drawing, legend, and an open question box."""
    return [], [], None, "", gr.MultimodalTextbox(value=None, interactive=True)


def _handlers(session: InferenceSession):
    """The event functions, closed over the session."""

    def add_turn(message: dict | None, turns: list[dict]):
        message = message or {}
        try:
            turn = user_turn(message.get("text", ""), checked_images(message.get("files") or []))
        except ChatInputError as error:
            raise gr.Error(str(error)) from None
        turns = [*turns, turn]
        return display(turns), turns, gr.MultimodalTextbox(value=None, interactive=False)

    def respond(turns: list[dict], max_new_tokens: float, temperature: float, top_p: float):
        if not turns or turns[-1]["role"] != "user":
            raise gr.Error("Ask a question first.")
        try:
            settings = settings_from(session.settings, max_new_tokens, temperature, top_p)
        except ChatInputError as error:
            raise gr.Error(str(error)) from None
        roles, contents, images = session_inputs(turns)
        reply = {"role": "assistant", "text": "", "images": []}
        answered = [*turns, reply]
        try:
            for piece in session.stream(roles, contents, images, settings):
                reply["text"] += piece
                yield display(answered), answered, gr.skip(), gr.skip()
        except Exception as error:  # the page says what failed; the server keeps serving
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed: {type(error).__name__}: {error}") from None
        try:
            picture, legend = grounding(turns, reply["text"])
        except Exception as error:  # an answer without its drawing is still an answer
            logger.exception("drawing the boxes failed")
            picture, legend = None, f"(boxes not drawn: {error})"
        yield display(answered), answered, picture, legend

    def drop_answer(turns: list[dict]):
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if not turns:
            raise gr.Error("Nothing to regenerate yet.")
        return display(turns), turns, gr.MultimodalTextbox(interactive=False)

    return add_turn, respond, drop_answer


def build_app(session: InferenceSession, *, title: str = TITLE) -> gr.Blocks:
    """The page for one loaded session; `launch` it (see `runtime.web.__main__`)."""
    add_turn, respond, drop_answer = _handlers(session)
    start = session.settings
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\n{HELP}")
        turns = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(  # plain text: <ref>/<box> tags stay visible as written
                    label="Chat", render_markdown=False, height=480, elem_id="chatbot",
                    buttons=["copy", "copy_all"],  # no "share" (to Hugging Face)
                )  # fmt: skip
                question = gr.MultimodalTextbox(
                    file_types=["image"],
                    file_count="multiple",
                    sources=["upload"],
                    placeholder="Ask about the images… / 请输入问题…",
                    show_label=False,
                    elem_id="question",
                )
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=2):
                drawing = gr.Image(
                    label="Boxes on the latest image",
                    type="pil",
                    interactive=False,
                    buttons=["download", "fullscreen"],
                    elem_id="boxes",
                )
                legend = gr.Textbox(
                    label="Boxes in the answer", lines=3, interactive=False, elem_id="legend"
                )
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(
                        1, MAX_NEW_TOKENS, min(start.max_new_tokens, MAX_NEW_TOKENS), step=1,
                        label="Max new tokens",
                    )  # fmt: skip
                    temperature = gr.Slider(
                        *TEMPERATURE_RANGE, start.temperature if start.do_sample else 0.0,
                        step=0.05, label="Temperature (0 = greedy)",
                    )  # fmt: skip
                    top_p = gr.Slider(
                        *TOP_P_RANGE, max(start.top_p, TOP_P_RANGE[0]), step=0.05, label="Top-p"
                    )
        settings = [max_new_tokens, temperature, top_p]
        reply_outputs = [chatbot, turns, drawing, legend]

        asked = question.submit(
            add_turn, [question, turns], [chatbot, turns, question], concurrency_limit=None
        )
        answering = asked.success(respond, [turns, *settings], reply_outputs)
        answering.then(unlock, None, question, concurrency_limit=None)
        retried = regenerate.click(
            drop_answer, [turns], [chatbot, turns, question], concurrency_limit=None
        )
        reanswering = retried.success(respond, [turns, *settings], reply_outputs)
        reanswering.then(unlock, None, question, concurrency_limit=None)
        running = [answering, reanswering]
        stop.click(unlock, None, question, cancels=running, queue=False)
        for clearing in (clear.click, chatbot.clear):  # the button and the chat's own bin icon
            clearing(reset, None, [*reply_outputs, question], cancels=running, queue=False)
    return app


def launch(
    app: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    max_file_size: str | int = "10mb",
    queue_size: int = 16,
    block: bool = True,
) -> None:
    """Serve `app`: one generation at a time, at most `queue_size` waiting; `block=False` returns
    once the server is up (tests; `app.close()` stops it)."""
    app.queue(default_concurrency_limit=1, max_size=queue_size)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        max_file_size=max_file_size,
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
