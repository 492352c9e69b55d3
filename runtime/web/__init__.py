"""The web chat: a Gradio page over one `InferenceSession` (`python -m runtime.web`, `sh web.sh`).

    chat.py       turns -> the session's (roles, contents, images); uploads, settings, boxes
    app.py        the page: streamed answers, stop / regenerate / clear, boxes drawn, a status line
    page.py       its style and script (a question after a file the browser refused is refused)
    __main__.py   flags, loading, safe launch defaults (127.0.0.1, no share link, queue, limits)

Box text is parsed and drawn by `dataprocess.boxes`, the same code `test.py --draw_boxes` and
the data tools use.
"""
