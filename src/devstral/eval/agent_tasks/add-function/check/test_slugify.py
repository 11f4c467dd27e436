import unittest

from textutils import slugify, title_case, word_count


class SlugifyTest(unittest.TestCase):
    def test_examples(self):
        self.assertEqual(slugify("Hello, World!"), "hello-world")
        self.assertEqual(slugify("  Already-slugged  "), "already-slugged")
        self.assertEqual(slugify("Python 3.12 -- release notes"), "python-3-12-release-notes")
        self.assertEqual(slugify("***"), "")
        self.assertEqual(slugify("über cool"), "ber-cool")

    def test_existing_helpers_still_work(self):
        self.assertEqual(word_count("a b  c"), 3)
        self.assertEqual(title_case("hello world"), "Hello World")


if __name__ == "__main__":
    unittest.main()
