"""roomapp: a phone UI driven by coordinator rules, and an assistant on the inference mesh."""

from pathlib import Path

from roomapp.assistant import Assistant
from roomapp.phone import PhoneUI

#: The coordinator rules this app ships.
RULES = Path(__file__).with_name("rules.toml")

__all__ = ["RULES", "Assistant", "PhoneUI"]
