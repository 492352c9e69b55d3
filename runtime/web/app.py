"""The Gradio page: upload images, chat in turns, answers streamed; stop / regenerate / clear;
generation settings; the answer's boxes drawn on the latest image next to the chat.

Every answer comes from `InferenceSession.stream` (the prompt is rendered by the session, as in
training). Gradio's queue runs one generation at a time (`default_concurrency_limit=1`): other
users wait their turn instead of interleaving on one model. A user mistake or a failing generation
is said on the status line under the question box - not as a `gr.Error`, whose toast vanishes
after 10 s and whose "Error" badges cover the chat and the question box - and the server goes on
serving. `pending` says whether the last action left a question for `respond` to answer.
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
from runtime.web.page import CSS, PAGE_JS, SUBMIT_JS, problem

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
    """An empty conversation: chat, turns, drawing, legend, status, an open question box."""
    return [], [], None, "", "", gr.MultimodalTextbox(value=None, interactive=True)


def _handlers(session: InferenceSession):
    """The event functions, closed over the session."""
    unchanged = gr.skip()

    def add_turn(message: dict | None, refused: str, turns: list[dict]):
        """-> chat, turns, question box, status, pending."""
        message = message or {}
        try:
            images = checked_images(message.get("files") or [])
            turn = user_turn(message.get("text", ""), images, refused.splitlines())
        except ChatInputError as error:  # the question stays in its box, to be fixed
            return unchanged, unchanged, unchanged, problem(str(error)), False
        turns = [*turns, turn]
        return display(turns), turns, gr.MultimodalTextbox(value=None, interactive=False), "", True

    def respond(
        pending: bool, turns: list[dict], max_new_tokens: float, temperature: float, top_p: float
    ):
        """Streams the answer to the last question -> chat, turns, drawing, legend, status."""
        if not pending or not turns or turns[-1]["role"] != "user":
            yield unchanged, unchanged, unchanged, unchanged, unchanged
            return
        try:
            settings = settings_from(session.settings, max_new_tokens, temperature, top_p)
        except ChatInputError as error:
            yield unchanged, unchanged, unchanged, unchanged, problem(str(error))
            return
        roles, contents, images = session_inputs(turns)
        reply = {"role": "assistant", "text": "", "images": []}
        answered = [*turns, reply]
        try:
            for piece in session.stream(roles, contents, images, settings):
                reply["text"] += piece
                yield display(answered), answered, unchanged, unchanged, unchanged
        except Exception as error:  # the page says what failed; the server keeps serving
            logger.exception("generation failed")
            failed = f"Generation failed: {type(error).__name__}: {error}. Regenerate tries again."
            yield display(turns), turns, unchanged, unchanged, problem(failed)
            return
        try:
            picture, legend = grounding(turns, reply["text"])
        except Exception as error:  # an answer without its drawing is still an answer
            logger.exception("drawing the boxes failed")
            picture, legend = None, f"(boxes not drawn: {error})"
        yield display(answered), answered, picture, legend, ""

    def drop_answer(turns: list[dict]):
        """-> chat, turns, question box, status, pending."""
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if not turns:
            return unchanged, unchanged, unchanged, problem("Nothing to regenerate yet."), False
        return display(turns), turns, gr.MultimodalTextbox(interactive=False), "", True

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
                status = gr.HTML(elem_id="status")  # what went wrong, until the next action
                refused = gr.Textbox(visible=False)  # files the browser refused (SUBMIT_JS)
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
        pending = gr.State(False)
        asking = [chatbot, turns, question, status, pending]
        reply_outputs = [chatbot, turns, drawing, legend, status]
        progress = [chatbot, drawing, legend]

        asked = question.submit(
            add_turn, [question, refused, turns], asking, js=SUBMIT_JS, concurrency_limit=None
        )
        retried = regenerate.click(drop_answer, [turns], asking, concurrency_limit=None)
        running = []
        for trigger in (asked, retried):
            answering = trigger.then(
                respond, [pending, turns, *settings], reply_outputs, show_progress_on=progress
            )
            answering.then(unlock, None, question, concurrency_limit=None)
            running.append(answering)
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
    once the server is up (tests; `app.close()` stops it). Gradio's own start-up lines are
    silenced: they tell users to set `share=True`, while this command's flag is `--share`."""
    app.queue(default_concurrency_limit=1, max_size=queue_size)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        max_file_size=max_file_size,
        ssr_mode=False,
        prevent_thread_lock=True,
        quiet=True,
        css=CSS,
        js=PAGE_JS,
    )
    logger.info("the chat is at %s", app.local_url)
    if app.share_url:
        logger.info("and, for anyone with the link, at %s", app.share_url)
    else:
        logger.info("no public link (--share makes one at gradio.live)")
    if block:
        app.block_thread()
