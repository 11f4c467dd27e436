"""Text helpers used across the project."""


def word_count(text):
    """Number of whitespace-separated words in `text`."""
    return len(text.split())


def title_case(text):
    """Capitalize the first letter of every word."""
    return " ".join(word[:1].upper() + word[1:] for word in text.split())
