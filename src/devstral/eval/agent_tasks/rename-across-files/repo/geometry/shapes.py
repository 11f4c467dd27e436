"""Areas and perimeters of rectangles."""


def calc_area(width, height):
    """Area of a width x height rectangle."""
    if width < 0 or height < 0:
        raise ValueError("sides must not be negative")
    return width * height


def perimeter(width, height):
    return 2 * (width + height)
