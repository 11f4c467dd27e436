import pathlib
import subprocess
import sys
import unittest


class RenameTest(unittest.TestCase):
    def test_old_name_is_gone(self):
        for path in pathlib.Path(".").rglob("*.py"):
            if path.name != "check_rename.py":
                self.assertNotIn("calc_area", path.read_text(), f"{path} still uses calc_area")

    def test_new_name_works(self):
        from geometry.report import describe, total_area
        from geometry.shapes import rectangle_area

        self.assertEqual(rectangle_area(3, 4), 12)
        self.assertEqual(describe(3, 4), "3x4: area 12, perimeter 14")
        self.assertEqual(total_area([(3, 4), (5, 2)]), 22)
        with self.assertRaises(ValueError):
            rectangle_area(-1, 2)

    def test_main_runs(self):
        out = subprocess.run([sys.executable, "main.py"], capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("largest: 12", out.stdout)


if __name__ == "__main__":
    unittest.main()
