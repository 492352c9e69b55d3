"""What the chat page adds to Gradio's own in the browser: its style and one script.

The script exists because Gradio refuses a too-large (`--max_file_size`) or non-image upload in
the browser, with a toast, before the server hears of it: the question typed next would then go
to the model without its image and get a nonsense answer. The script notes each refused file; the
question's submit hands the names to the server, which refuses that question with the reason.
"""

from __future__ import annotations

import html

# The status line sits under the question box: it covers nothing and stays until the next action.
# Gradio 6.31 gives every image in the chat a "Share" button (to Hugging Face) that no setting
# turns off; it is the button right after the image's download link (its label is translated).
CSS = """
#status .status-problem { color: var(--error-text-color); padding: 0 var(--spacing-md); }
#chatbot .message-buttons a.download-link + button,
#chatbot .message-buttons button[aria-label="Share"] { display: none; }
"""

# Runs once when the page loads. Gradio's own limit is in its page config (bytes).
PAGE_JS = """
() => {
  window.vlmRefusedUploads = [];
  const size = (bytes) => bytes >= 1048576 ? (bytes / 1048576).toFixed(1) + " MB"
                                           : (bytes / 1024).toFixed(0) + " KB";
  const note = (files) => {
    const limit = (window.gradio_config && window.gradio_config.max_file_size) || Infinity;
    for (const file of files || []) {
      if (file.size > limit) {
        window.vlmRefusedUploads.push(`${file.name} (${size(file.size)}, over the ${size(limit)} limit)`);
      } else if (!(file.type || "").startsWith("image/")) {
        window.vlmRefusedUploads.push(`${file.name} (not an image)`);
      }
    }
  };
  const inQuestion = (event) => event.target.closest && event.target.closest("#question");
  document.addEventListener("change", (event) => {
    if (inQuestion(event) && event.target.files) note(event.target.files);
  }, true);
  document.addEventListener("drop", (event) => {
    if (inQuestion(event) && event.dataTransfer) note(event.dataTransfer.files);
  }, true);
}
"""

# Runs on the question's submit, before the server: the refusals since the last submit go with it.
SUBMIT_JS = """
(message, refused, turns) => {
  const names = (window.vlmRefusedUploads || []).splice(0);
  return [message, names.join("\\n"), turns];
}
"""


def problem(message: str) -> str:
    """The status line's HTML for a message to the user (file names escaped)."""
    return f'<p class="status-problem">⚠ {html.escape(message)}</p>' if message else ""
