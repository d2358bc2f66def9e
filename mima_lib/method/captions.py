"""Regularization captions for the merge's C_reg: ordinary captions of scenes, objects, styles and people.

Custom Diffusion's merge keeps the merged K/V projections close to the originals on C_reg, the text states of
"everything else"; the reference code uses 200 real captions. These 210 were written for this project.
A caption that names a target concept would tell the merge to keep exactly what immunization removes:
:func:`generic_captions` leaves those out, and :func:`captions_naming` finds them in a list of your own.
"""
from __future__ import annotations

import re

__all__ = ["GENERIC_CAPTIONS", "generic_captions", "captions_naming"]

GENERIC_CAPTIONS = tuple("""
a red bicycle leaning against a brick wall
a bowl of fresh fruit on a wooden table
a city street at night with glowing shop signs
an old man reading a newspaper on a park bench
a mountain lake surrounded by pine trees
a plate of spaghetti with tomato sauce
a child flying a kite on a windy beach
a cozy living room with a fireplace
a watercolor painting of a harbor at dawn
a black and white photograph of a train station
two women laughing over cups of coffee
a field of sunflowers under a blue sky
a stack of books next to a reading lamp
a snowy village with smoke rising from chimneys
a close-up of a dewdrop on a green leaf
a busy market with baskets of vegetables
a wooden rowboat tied to a dock
a portrait of a young woman with curly hair
a desert road stretching to the horizon
a kitchen with copper pots hanging on the wall
a cartoon drawing of a smiling sun
a lighthouse on a rocky coast during a storm
a glass of orange juice on a breakfast tray
a group of friends hiking up a hill
an oil painting of a vase of roses
a skyscraper reflected in a glass facade
a sleepy town square with a fountain
a pair of running shoes on a gravel path
a vintage typewriter on a desk
a rainy window with blurred city lights
a farmer driving a tractor through a wheat field
a sketch of a human hand in pencil
a bridge over a calm river at sunset
a table set for a dinner party
a musician playing guitar on a stage
an aerial view of a winding river
a pile of autumn leaves in a garden
a steaming bowl of soup on a cold day
a family having a picnic in the park
a neon sign reading open in a diner window
a marble statue in a museum hall
a forest path covered in morning fog
a chef slicing vegetables in a restaurant kitchen
a collection of seashells on the sand
a hot air balloon over green hills
an abstract composition of colorful shapes
a bakery display full of bread and pastries
a little girl blowing out birthday candles
a foggy pier stretching into the sea
a bookshelf filled with old leather books
a crowded subway car during rush hour
a mosaic of blue and white tiles
a basket of apples in an orchard
a man in a suit waiting for a bus
a quiet library with tall windows
a snow-covered mountain peak at sunrise
a charcoal drawing of a city skyline
a wooden cabin in the woods
a bouquet of tulips in a glass jar
a student writing notes in a classroom
a waterfall in a tropical jungle
a street musician playing the violin
a still life with bottles and lemons
a crowd watching fireworks over a river
a grandmother knitting a scarf
a sailboat on a turquoise sea
a plate of sushi on a black tray
a cobblestone alley in an old town
a pencil drawing of a sleeping baby
a road trip view through a car windshield
a field of lavender in summer
a candle burning on a windowsill
a soccer match in a packed stadium
a traditional house with a tiled roof
a digital illustration of a futuristic city
a wooden chair in an empty room
a thunderstorm over the prairie
a couple dancing in a ballroom
a cup of tea with a slice of lemon
a harbor full of fishing boats
a bright yellow taxi on a busy avenue
a quiet beach with footprints in the sand
an embroidered pillow on a sofa
a teenager skateboarding in a park
a pastel drawing of a garden path
a dinner plate with roasted vegetables
a castle on a hill above a river
an umbrella stand by a front door
a bustling train platform in winter
a painting of peasants working in a field
a silhouette of a tree against the moon
a laptop and a notebook on a cafe table
a carousel at a night fair
a bowl of ramen with a boiled egg
a scientist looking into a microscope
a row of colorful houses by the water
a frozen pond with ice skaters
a woodcut print of ocean waves
a garden with a stone bench and roses
a jar of honey on a kitchen counter
an empty highway at dusk
a fisherman casting a line at dawn
a graffiti mural on a concrete wall
a grand piano in a concert hall
a picnic blanket with sandwiches and fruit
a misty valley with rolling hills
a doctor talking to a patient
a set of paint brushes in a jar
a rooftop view of a sprawling city
a toddler playing with wooden blocks
a minimalist poster with a single circle
a country road lined with poplar trees
a glass greenhouse full of plants
a plate of pancakes with syrup
a crowded beach on a summer day
an ink drawing of bamboo stalks
a bus stop in the rain
a wedding cake with white frosting
an old wooden door with iron hinges
a runner crossing a finish line
a landscape painting with dramatic clouds
a vegetable garden in the backyard
a street food stall at night
a quiet church interior with stained glass
a pile of firewood next to a shed
a boy reading a comic book
a view of the stars over a desert
a pottery workshop with clay bowls
a sunny balcony with potted herbs
a colorful kite against the clouds
a portrait of an elderly man with a beard
a river flowing through a canyon
a basket of bread rolls
a classroom with a chalkboard
a cubist style still life
a wooden pier on a lake in autumn
a crowd at an outdoor concert
a bicycle parked beside a canal
a mug of hot chocolate with marshmallows
a narrow street with laundry hanging overhead
a photograph of a foggy forest road
a tabletop covered with maps and a compass
a surfer riding a large wave
a cottage garden full of wildflowers
a dish of ice cream with berries
a train crossing a stone viaduct
a comic book panel with a superhero
a calm sea under a pink sky
a woman painting at an easel
a row of bicycles at a rack
a plate of tacos with lime
a rustic barn in a green meadow
a rainy afternoon in a small cafe
a man repairing a bicycle in a garage
a pen and ink drawing of a cathedral
a campfire under a starry sky
a toy train set on a carpet
a view of rice terraces in the mountains
a dog-eared paperback on a blanket
a busy airport terminal
a woman walking through a wheat field
a tray of cookies fresh from the oven
a stone wall covered in ivy
an impressionist painting of a garden pond
a group of children playing soccer
a silver teapot on a lace tablecloth
a boardwalk through a marsh
a night sky with the milky way
a vendor selling flowers on a corner
a sculpture made of twisted metal
a bowl of cereal with milk
a snowy forest with a wooden sign
a jazz band playing in a small club
a desk with a globe and an old lamp
a city park in spring bloom
a hand holding a cup of coffee
a geometric pattern of triangles
a bus driving along a coastal road
a tall glass of iced lemonade
a cliff overlooking the ocean
a father teaching his son to ride a bike
a pixel art scene of a small village
a vase of dried flowers on a shelf
a crowded pedestrian crossing
a meadow with grazing horses
a loaf of bread on a cutting board
a medieval tapestry with hunters
an apartment window with plants
a dark alley lit by a single lamp
a pair of glasses on an open book
a fountain pen and a letter
a lively carnival parade
a rocky shoreline at low tide
a close-up of a spiral staircase
a farmhouse kitchen at breakfast time
a crayon drawing of a house and a tree
a foggy morning over a harbor town
a basket of knitting yarn
a winter street with holiday lights
a canoe on a still mountain lake
a plate of cheese and grapes
a subway entrance in the city
a woman holding a bouquet of daisies
a rolling landscape under storm clouds
a chess board in the middle of a game
a mural of birds and flowers
a sandy path between dunes
an elegant dining room with a chandelier
a clay pot with a small cactus
a group photo at a graduation
""".strip().splitlines())


def _names_pattern(names) -> re.Pattern | None:
    words = [re.escape(" ".join(str(n).lower().split())) for n in names if str(n).strip()]
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(words) + r")(s|es)?\b", re.IGNORECASE)


def captions_naming(captions, names) -> list[str]:
    """The captions that contain one of ``names`` as a word (case-insensitive, plurals too)."""
    pattern = _names_pattern(names)
    return [] if pattern is None else [c for c in captions if pattern.search(c)]


def generic_captions(exclude_names=()) -> list[str]:
    """GENERIC_CAPTIONS without those that name one of ``exclude_names`` (the immunization targets)."""
    bad = set(captions_naming(GENERIC_CAPTIONS, exclude_names))
    return [c for c in GENERIC_CAPTIONS if c not in bad]
