"""Queries of vLLM's published Grafana dashboard, written out by hand (not a copy of the file).

Source: github.com/vllm-project/vllm, examples/observability/prometheus_grafana/grafana.json
(commit 4b5c627c23e6690b8987100d1cbf78e34ac14bf9), panel by panel, with Grafana's
``$model_name`` variable and ``$__rate_interval`` left in as the dashboard writes them. The
dashboard's ``model_name`` variable is ``label_values(model_name)``.

The last panel is not in that file: ``vllm:time_per_output_token_seconds`` (vLLM's older name
for the inter-token latency histogram, still read by many dashboards and autoscalers), queried
in the same shape as the dashboard's inter-token latency panel.
"""

from __future__ import annotations

MODEL_VARIABLE_LABEL = "model_name"

SEL = '{model_name="$model_name"}'
RATE = "[$__rate_interval]"


def _latency_panel(metric: str) -> list[str]:
    quantiles = [
        f"histogram_quantile({q}, sum by(le) (rate({metric}_bucket{SEL}{RATE})))"
        for q in ("0.99", "0.95", "0.9", "0.5")
    ]
    mean = f"rate({metric}_sum{SEL}{RATE})\n/\nrate({metric}_count{SEL}{RATE})"
    return [*quantiles, mean]


PANELS: dict[str, list[str]] = {
    "E2E Request Latency": _latency_panel("vllm:e2e_request_latency_seconds"),
    "Token Throughput": [
        f"rate(vllm:prompt_tokens_total{SEL}{RATE})",
        f"rate(vllm:generation_tokens_total{SEL}{RATE})",
    ],
    "Inter Token Latency": _latency_panel("vllm:inter_token_latency_seconds"),
    "Scheduler State": [
        f"vllm:num_requests_running{SEL}",
        f"vllm:num_requests_waiting{SEL}",
    ],
    "Time To First Token Latency": _latency_panel("vllm:time_to_first_token_seconds"),
    "Cache Utilization": [f"vllm:kv_cache_usage_perc{SEL}"],
    "Request Prompt Length": [
        f"sum by(le) (increase(vllm:request_prompt_tokens_bucket{SEL}{RATE}))",
    ],
    "Request Generation Length": [
        f"sum by(le) (increase(vllm:request_generation_tokens_bucket{SEL}{RATE}))",
    ],
    "Finish Reason": [
        f"sum by(finished_reason) (increase(vllm:request_success_total{SEL}{RATE}))",
    ],
    "Queue Time": [f"rate(vllm:request_queue_time_seconds_sum{SEL}{RATE})"],
    "Requests Prefill and Decode Time": [
        f"rate(vllm:request_prefill_time_seconds_sum{SEL}{RATE})",
        f"rate(vllm:request_decode_time_seconds_sum{SEL}{RATE})",
    ],
    "Max Generation Token in Sequence Group": [
        f"rate(vllm:request_max_num_generation_tokens_sum{SEL}{RATE})",
    ],
    # Not in the file above; see the module docstring.
    "Time Per Output Token Latency": _latency_panel("vllm:time_per_output_token_seconds"),
}
