"""The quality gates a recipe can set on measured quality: gate -> (the metric it needs measured, the
figure of the report it reads). The size gate, max_bits_per_weight, reads the built file instead."""

GATES = {"max_ppl_increase": ("perplexity", "ppl_increase"), "max_kl": ("kl_divergence", "kl_divergence"),
         "min_top1": ("top1_agreement", "top1_agreement")}
