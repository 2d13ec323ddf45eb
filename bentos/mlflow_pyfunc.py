"""MLflow "models from code" entry: every lockgate model version is a pyfunc users can load.

``mlflow.pyfunc.load_model("models:/NAME/Production").predict(["Q: ...\\nA:"])`` returns the
generated continuations. The model files sit in the logged model's artifact ``model``; the
``bentos`` package travels with it as code, so loading needs nothing from flows/ or tasks/.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class LockgateLLM(PythonModel):
    def load_context(self, context) -> None:
        from lockgate.bentos.runtime import load_model

        self._lm = load_model(Path(context.artifacts["model"]))

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        prompts = list(model_input)
        budget = int((params or {}).get("max_new_tokens", 16))
        return [g.text for g in self._lm.generate([str(p) for p in prompts], max_new_tokens=budget)]


mlflow.models.set_model(LockgateLLM())
