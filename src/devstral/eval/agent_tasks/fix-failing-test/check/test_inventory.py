import unittest

from inventory import restock, total_value


class InventoryTest(unittest.TestCase):
    def test_total_value(self):
        self.assertEqual(total_value([("pen", 2, 10), ("book", 15, 3)]), 65)

    def test_empty(self):
        self.assertEqual(total_value([]), 0)

    def test_restock(self):
        stock = {"pen": 1}
        self.assertEqual(restock(stock, "pen", 4), 5)
        self.assertEqual(restock(stock, "ink", 2), 2)
        with self.assertRaises(ValueError):
            restock(stock, "pen", -1)


if __name__ == "__main__":
    unittest.main()
