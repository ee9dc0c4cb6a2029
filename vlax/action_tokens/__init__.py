"""Action tokenizers that live outside ``jit`` (BPE): their token ids feed the LM-decoding heads."""

from vlax.action_tokens.fast import DecodeStats, FastTokenizer, dct_coefficients, inverse_dct

__all__ = ["DecodeStats", "FastTokenizer", "dct_coefficients", "inverse_dct"]
