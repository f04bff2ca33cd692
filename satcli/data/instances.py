"""COCO instance annotations (``instances_val2014.json``) as the ``objects`` of COCO images.

``satcli preprocess --dataset coco ... --instances instances_val2014.json`` gives every image its annotated
objects: ``box`` ``[x0, y0, x1, y1]`` in pixels (COCO stores ``[x, y, width, height]``), ``label`` the category
name, and ``words`` the words a caption may use for it: the name, a few synonyms and their plurals. Images are
matched by file name, so the instance file of the other split simply matches nothing.

The words follow CHAIR's rules (Rohrbach et al. 2018; LisaAnne/Hallucination, ``data/synonyms.txt`` and
``utils/chair.py``): every synonym here is one that list gives the category, except a few it leaves out that
can only mean it (``surfer``, ``kitty``, ``mug``, ...); the words it keeps out because they mean other things
too (``glass``, ``board``, ``bat``, ``glove``, ``meter``, ``plant``, ``controller``) are not here either, so "a
glass of water" names no wine glass. And as CHAIR's "double words" do, ``baby <animal>`` and ``adult <animal>``
are phrases naming the animal, not a person: "a baby elephant" names an elephant only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from satcli.core.errors import SatcliError
from satcli.data.datasets.records import ImageRecord, ObjectBox

# Category → other words captions use for it (singular; plurals are added). Names with spaces are phrases.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "people", "guy", "lady", "player", "skier",
               "surfer", "skateboarder", "baby", "adult", "men", "women", "children", "person"),
    "bicycle": ("bike",), "car": ("automobile", "taxi", "suv"), "motorcycle": ("motorbike", "scooter"),
    "airplane": ("plane", "jet", "aircraft", "airliner"), "bus": ("buses",), "train": ("locomotive",),
    "truck": ("pickup",), "boat": ("ship", "kayak", "canoe", "sailboat"), "traffic light": ("stoplight",),
    "fire hydrant": ("hydrant",), "stop sign": (), "parking meter": (), "bench": (),
    "bird": ("pigeon", "seagull", "duck", "parrot"), "cat": ("kitten", "kitty"), "dog": ("puppy", "pup"),
    "horse": ("pony",), "sheep": ("lamb",), "cow": ("cattle", "bull", "calf"), "elephant": (), "bear": (),
    "zebra": (), "giraffe": (), "backpack": (), "umbrella": ("parasol",), "handbag": ("purse",), "tie": (),
    "suitcase": ("luggage",), "frisbee": (), "skis": ("ski",), "snowboard": (), "sports ball": ("ball",),
    "kite": (), "baseball bat": (), "baseball glove": (), "skateboard": (),
    "surfboard": ("longboard",), "tennis racket": ("racket", "racquet"), "bottle": (), "wine glass": (),
    "cup": ("mug",), "fork": (), "knife": (), "spoon": (), "bowl": (), "banana": (), "apple": (),
    "sandwich": ("burger", "sub"), "orange": (), "broccoli": (), "carrot": (), "hot dog": (), "pizza": (),
    "donut": ("doughnut",), "cake": ("cupcake",), "chair": ("stool",), "couch": ("sofa",),
    "potted plant": ("houseplant",), "bed": (), "dining table": ("table", "desk"), "toilet": (),
    "tv": ("television",), "laptop": ("computer", "notebook"), "mouse": (), "remote": (),
    "keyboard": (), "cell phone": ("phone", "cellphone", "smartphone"), "microwave": (), "oven": ("stove",),
    "toaster": (), "sink": (), "refrigerator": ("fridge",), "book": ("novel",), "clock": (), "vase": (),
    "scissors": (), "teddy bear": ("teddybear",), "hair drier": ("hairdryer", "hair dryer"),
    "toothbrush": (),
}
_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
              "knife": "knives", "sheep": "sheep", "skis": "skis", "scissors": "scissors", "bus": "buses",
              "people": "people", "men": "men", "women": "women", "children": "children", "cattle": "cattle",
              "luggage": "luggage", "broccoli": "broccoli", "calf": "calves"}


def plural(name: str) -> str:
    """``dog`` → ``dogs``, ``bus`` → ``buses``, ``man`` → ``men``; only the last word of a phrase changes."""
    *head, last = name.split()
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


# CHAIR's animals: "baby dog" and "adult dog" name the dog (CHAIR's double words), not a person and a dog
ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")


def category_words(name: str) -> list[str]:
    """The words a caption may use for a COCO category: its name, synonyms, ``baby``/``adult`` + an animal's name
    (see the module docstring), and their plurals."""
    name = name.lower()
    singular = [name, *SYNONYMS.get(name, ())]
    if name in ANIMALS:
        singular += [f"baby {name}", f"adult {name}"]
    return list(dict.fromkeys(w for word in singular for w in (word, plural(word))))


def read_coco_instances(path: Path) -> dict[str, list[ObjectBox]]:
    """Objects per image file name of a COCO instance annotation JSON."""
    import json

    def bad(where: str, message: str) -> SatcliError:
        return SatcliError(f"{where}: {message}", path=path)

    try:
        doc: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SatcliError("instance annotation file not found", path=path) from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SatcliError(f"not a readable JSON file ({error})", path=path) from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations",
                                                                                  "categories")):
        raise bad("top level", "a COCO instance file has lists 'images', 'annotations' and 'categories'")
    names: dict[int, str] = {}
    for i, category in enumerate(doc["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) \
                or not isinstance(category.get("name"), str):
            raise bad(f"categories[{i}]", "needs an integer 'id' and a string 'name'")
        names[category["id"]] = category["name"]
    files: dict[int, str] = {}
    for i, image in enumerate(doc["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) \
                or not isinstance(image.get("file_name"), str):
            raise bad(f"images[{i}]", "needs an integer 'id' and a string 'file_name'")
        files[image["id"]] = Path(image["file_name"]).name
    objects: dict[str, list[ObjectBox]] = {name: [] for name in files.values()}
    for j, annotation in enumerate(doc["annotations"]):
        where = f"annotations[{j}]"
        if not isinstance(annotation, dict):
            raise bad(where, "must be an object")
        image_id, category, box = (annotation.get(k) for k in ("image_id", "category_id", "bbox"))
        if image_id not in files:
            raise bad(where, f"image_id {image_id!r} is not in images[]")
        if category not in names:
            raise bad(where, f"category_id {category!r} is not in categories[]")
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int | float) for v in box) \
                or box[2] < 0 or box[3] < 0:
            raise bad(where, f"bbox must be [x, y, width, height] with width, height >= 0, got {box!r}")
        x, y, width, height = (float(v) for v in box)
        name = names[category]
        objects[files[image_id]].append(ObjectBox((x, y, x + width, y + height), name, category_words(name)))
    return objects


def attach_instances(records: list[ImageRecord], path: Path) -> int:
    """Give each record the objects of its image (matched by file name). Returns how many images matched."""
    by_file = read_coco_instances(path)
    matched = 0
    for record in records:
        found = by_file.get(Path(record.path).name)
        if found is not None:
            record.objects = list(found)
            matched += 1
    return matched
