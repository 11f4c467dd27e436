"""The agent's editor shows an image it views to a model that takes images: the picture follows the tool
results as a user message (pixels intact), which the real prompt encoder (mistral-common's validator and
image encoder) takes; a text-only model is told it cannot see it."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from devstral.agent import Finished
from test_agent_loop import call, make_agent, tool_messages
from test_vision import _ckpt, png


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _viewing(ws: Path, sees_images: bool):
    agent, model = make_agent(ws, [[call("str_replace_editor", command="view", path=str(ws / "shot.png"))],
                                   [call("finish", message="done")]])
    model.sees_images = sees_images  # the editor asks the model at each step
    return agent, model


def test_view_of_an_image_shows_it_to_a_vision_model(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    data = png(45, 29, 3)
    (ws / "shot.png").write_bytes(data)
    agent, model = _viewing(ws, True)
    assert isinstance(agent.run("What does shot.png show?"), Finished)
    assert tool_messages(agent)[0] == f"{ws / 'shot.png'} is a PNG image of 45x29 pixels; it is shown to you in the next message."
    shown = model.seen[1][-1]  # what the model saw when it answered the view
    assert shown["role"] == "user" and shown["content"][0] == {"type": "text", "text": f"{ws / 'shot.png'}:"}
    url = shown["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(_pixels(base64.b64decode(url.split(",", 1)[1])), _pixels(data))


def test_a_text_only_model_is_told_it_cannot_see_images(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "shot.png").write_bytes(png(8, 8))
    agent, model = _viewing(ws, False)
    assert isinstance(agent.run("Look at shot.png"), Finished)
    observation = tool_messages(agent)[0]
    assert observation.startswith("ERROR: ") and "PNG image, and this model cannot see images" in observation
    assert all(m["role"] != "user" for m in model.seen[1][2:])


def test_a_corrupt_image_is_an_observation(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "shot.png").write_bytes(png(40, 40)[:-60])
    agent, _ = _viewing(ws, True)
    assert isinstance(agent.run("Look at shot.png"), Finished)
    assert "corrupt or truncated image" in tool_messages(agent)[0]


def test_the_in_process_vision_model_sees_the_agents_image(tmp_path):
    """InProcessChatModel says it takes images; the agent's conversation (tool call, tool result, the
    image as the user's) encodes through mistral-common with the image's tokens where it is."""
    from devstral.agent.inprocess_model import InProcessChatModel

    model = InProcessChatModel(str(_ckpt(tmp_path)), device="cpu", backend="torch", dtype="fp32", max_context=256)
    assert model.sees_images
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "shot.png").write_bytes(png(45, 29, 3))
    agent, _ = _viewing(ws, True)
    assert isinstance(agent.run("What does shot.png show?"), Finished)
    messages = agent.messages[:-1]  # system, task, the view call, its result, the image (not the finish call)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    ids = model.llm.tokenizer.encode_chat(messages, agent.toolbox.schemas)
    assert len(ids.images) == 1
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(str(model.llm.tokenizer.path)).encode_chat_completion(
        ChatCompletionRequest.from_openai(messages, tools=agent.toolbox.schemas))
    assert list(ids) == reference.tokens
    np.testing.assert_array_equal(ids.images[0].pixels, reference.images[0])


def test_an_endpoint_model_sees_images_when_the_server_says_so():
    """llama.cpp's server and devstral serve answer GET /props with `modalities.vision`."""
    import httpx

    from devstral.agent.endpoint_model import EndpointChatModel

    def server(vision):
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/models":
                return httpx.Response(200, json={"data": [{"id": "m"}]})
            if request.url.path == "/props" and vision is not None:
                return httpx.Response(200, json={"modalities": {"vision": vision, "audio": False}})
            return httpx.Response(404, json={})
        return httpx.MockTransport(handler)

    for vision, expected in ((True, True), (False, False), (None, False)):
        model = EndpointChatModel("http://x/v1", transport=server(vision))
        model.check()
        assert model.sees_images is expected
