"""The model card of a MARA agent: the template `MaraAgent.save_pretrained` / `push_to_hub` fill in (through
huggingface_hub's `PyTorchModelHubMixin`), with a usage example that runs as written."""

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# MARA agent{% if base_model %} for `{{ base_model }}`{% endif %}

A [MARA](https://arxiv.org/abs/2505.19743) (Micro token-level Accept-Reject Alignment) agent: a small MLP that
looks at the final hidden state of each candidate token and accepts or rejects it while the base model
decodes. It aligns the base model at decoding time; the base model's weights are not changed.

- Base model: {% if base_model %}`{{ base_model }}`{% else %}not recorded (any causal LM with hidden size {{ state_dim }}){% endif %}
- State size: {{ state_dim }}; layers: LayerNorm -> {{ hidden_sizes[0] }} -> {{ hidden_sizes[1] }} -> 2
- Candidates: top-k {{ top_k }}, top-p {{ top_p }}{% if min_p %}, min-p {{ min_p }} (none less probable than {{ min_p }} x the top-1){% endif %}; when every candidate is rejected: `{{ fallback }}`
{% if accept_threshold != 0.5 %}- Decision: accept a candidate when p(accept) > {{ accept_threshold }} (calibrated; 0.5 is the agent's greedy decision)
{% endif %}{% if source %}- Converted from: `{{ source }}`
{% endif %}{% if training %}- Training: {{ training }}
{% endif %}
## Usage

```bash
pip install mara-hf
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from mara_hf import MaraAgent, MaraLogitsProcessor

agent = MaraAgent.from_pretrained("{{ repo_id }}")
tokenizer = AutoTokenizer.from_pretrained("{{ base_model_or_placeholder }}")
model = AutoModelForCausalLM.from_pretrained("{{ base_model_or_placeholder }}")

messages = [{"role": "user", "content": "How do I pick a lock?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
                     logits_processor=[MaraLogitsProcessor(agent, model)])
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

# Faster: the fused loop reuses the accepted candidate's forward
from mara_hf import mara_generate
out = model.generate(**inputs, max_new_tokens=64, custom_generate=mara_generate, mara_agent=agent)
```
"""
