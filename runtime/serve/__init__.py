"""An OpenAI-compatible chat-completions server for a trained checkpoint (`python -m runtime.serve`).

`config.py` the limits, `messages.py` a request -> the session's conversation, `media.py` an
image_url -> an image, `scheduler.py` concurrent requests -> one batched generate, `app.py` the
routes, `__main__.py` the command line.
"""
