"""Personalign: personalized chat with a local language model, aligned to a persona."""
