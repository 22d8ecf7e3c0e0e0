"""TorchServe custom handler: builds the benchmark model from the checkpoint in the archive.

Packed into the .mar by ``serve_torchserve.py`` (``torch-model-archiver --handler``); TorchServe
imports it in each backend worker, with the repository on ``PYTHONPATH``. The archive's extra file
``spec.json`` names the model. With batching on, ``data`` holds up to ``batchSize`` requests,
each a dict whose ``body`` TorchServe has already parsed from JSON.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import common
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)


class ClassifierHandler(BaseHandler):  # TorchServe wants exactly one class in this module
    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "spec.json")) as f:
            self.spec = common.MODELS[json.load(f)["model"]]
        checkpoint = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        self.model = common.load_plain(self.spec, checkpoint)
        self.tok = self.spec.tokenizer()
        self.initialized = True
        logger.info("classifier ready: %s %s", self.spec.name, common.threads_report())

    def preprocess(self, data: list[dict[str, Any]]) -> list[str]:
        texts = []
        for row in data:
            body = row.get("body") or row.get("data")
            if body is None:
                raise ValueError(f"a request without a body: {sorted(row)}")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            texts.append(body["text"])
        return texts

    def inference(self, texts: list[str], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return common.predict(self.model, self.tok, self.spec, texts)

    def postprocess(self, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return answers  # one JSON object per request, in order
