"""One line per rectangle: its sides, area and perimeter."""

from geometry.shapes import calc_area, perimeter


def describe(width, height):
    return f"{width}x{height}: area {calc_area(width, height)}, perimeter {perimeter(width, height)}"


def total_area(rectangles):
    return sum(calc_area(w, h) for w, h in rectangles)
