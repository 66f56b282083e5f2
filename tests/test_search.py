"""What the searches try (memopt/search.py): each strategy's typical settings that apply to a spec."""

from __future__ import annotations


def test_quantization_is_a_candidate_on_widths_the_group_size_does_not_divide(tiny_decoder):
    """tiny-decoder's ffn 176 is not a multiple of 64: quant used to be refused there, so the search never
    had it (a llama-shaped model with ffn 1376 found no quantization and ended in 'nothing fits')."""
    from memopt.analysis.search import candidate_settings

    settings = candidate_settings(tiny_decoder, "cpu")
    assert "quant:bits=4,lora=8" in [s.label for s in settings["quant"]] and len(settings["quant"]) >= 3
