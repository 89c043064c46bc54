# SoulBox code interpreter: IPython start-up code, run silently in every new IPython kernel.
#
# Registers two extra display formats that the E2B SDKs understand:
#   e2b/data   pandas DataFrame -> {column: [values]}
#   e2b/chart  matplotlib Figure -> chart JSON (line, scatter, bar, pie, box_and_whisker,
#              superchart, unknown)
# and makes PIL's Image.show() (and Image.save() to a path) display the image.
#
# Nothing heavy is imported here: the formatters are registered by type *name*, so pandas,
# matplotlib and PIL are only touched once user code imports them. Every formatter swallows
# its own errors, because an exception inside an IPython formatter would be reported as an
# error of the user's cell.


def __soulbox_startup():
    import importlib.abc
    import math
    import os
    import re
    import sys

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    ip = get_ipython()
    if ip is None:
        return

    # Plain tracebacks (no ANSI colours) and untruncated reprs, as E2B clients expect.
    try:
        ip.run_line_magic("colors", "nocolor")
    except Exception:
        pass
    ip.display_formatter.formatters["text/plain"].max_seq_length = 0

    # ----------------------------------------------------------------------------------
    # JSON-safe values

    def jsonable(value):
        if value is None or isinstance(value, (bool, str, int)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if type(value).__module__ == "numpy" and hasattr(value, "item"):
            try:
                return jsonable(value.item())
            except Exception:
                return str(value)
        if hasattr(value, "isoformat"):
            try:
                if value != value:  # NaT
                    return None
            except Exception:
                pass
            try:
                return value.isoformat()
            except Exception:
                return str(value)
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
        if isinstance(value, dict):
            return {str(k): jsonable(v) for k, v in value.items()}
        return str(value)

    def quietly(function):
        def formatter(obj):
            try:
                return function(obj)
            except Exception:
                return None

        return formatter

    # ----------------------------------------------------------------------------------
    # pandas

    def dataframe_data(frame):
        return {
            str(name): [jsonable(v) for v in column.tolist()]
            for name, column in frame.items()
        }

    # ----------------------------------------------------------------------------------
    # matplotlib

    def close(a, b):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))

    def legend_label(label):
        # matplotlib names unlabelled artists "_child0", "_nolegend_", ...: no label.
        label = "" if label is None else str(label)
        return "" if label.startswith("_") else label

    def label_and_unit(text):
        if not text:
            return None, None
        groups = re.findall(r"\(([^()]*)\)|\[([^\[\]]*)\]", text)
        unit = None
        if groups:
            paren, bracket = groups[-1]
            unit = (paren or bracket).strip() or None
        return text, unit

    def axes_labels(ax):
        x_label, x_unit = label_and_unit(ax.get_xlabel())
        y_label, y_unit = label_and_unit(ax.get_ylabel())
        return {"x_label": x_label, "y_label": y_label, "x_unit": x_unit, "y_unit": y_unit}

    def axis_converter(axis):
        if hasattr(axis, "get_converter"):
            return axis.get_converter()
        return getattr(axis, "converter", None)

    def scale_of(axis):
        scale = axis.get_scale()
        if scale != "linear":
            return scale
        converter = axis_converter(axis)
        if converter is None:
            return scale
        import matplotlib.category
        import matplotlib.dates

        if isinstance(converter, matplotlib.category.StrCategoryConverter):
            return "categorical"
        if isinstance(converter, matplotlib.dates.DateConverter) or (
            type(converter).__module__ == "matplotlib.dates"
        ):
            return "datetime"
        return scale

    def tick_texts(axis):
        return [(float(loc), label.get_text()) for loc, label in zip(axis.get_ticklocs(), axis.get_ticklabels())]

    def tick_label_near(axis, position):
        """The label of the tick at `position` (within half a tick spacing), else the number."""
        ticks = tick_texts(axis)
        if ticks:
            spacing = min(
                (abs(b[0] - a[0]) for a, b in zip(ticks, ticks[1:]) if b[0] != a[0]),
                default=math.inf,
            )
            loc, text = min(ticks, key=lambda t: abs(t[0] - position))
            if text and (close(loc, position) or abs(loc - position) < spacing / 2):
                return text
        return format_number(position)

    def format_number(value):
        value = float(value)
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)

    def coordinate(value, scale, axis):
        value = float(value)
        if not math.isfinite(value):
            return None
        if scale == "datetime":
            import matplotlib.dates

            return matplotlib.dates.num2date(value).isoformat()
        if scale == "categorical":
            return tick_label_near(axis, value)
        return value

    def ticks(axis, scale):
        low, high = sorted(axis.get_view_interval())
        span = high - low
        locs, labels = [], []
        for loc, text in tick_texts(axis):
            if low - 1e-9 * span <= loc <= high + 1e-9 * span:
                locs.append(text if scale == "categorical" else coordinate(loc, scale, axis))
                labels.append(text)
        return locs, labels

    def pie_chart(ax, title):
        from matplotlib.patches import Wedge

        wedges = [p for p in ax.patches if isinstance(p, Wedge)]
        if not wedges:
            return None
        return {
            "type": "pie",
            "title": title,
            "elements": [
                {
                    "label": legend_label(w.get_label()),
                    "angle": round(abs(float(w.theta2) - float(w.theta1)), 10),
                    "radius": round(float(w.r), 10),
                }
                for w in wedges
            ],
        }

    def is_rectangle(points):
        if len(points) < 4:
            return None
        xs = sorted({float(p[0]) for p in points})
        ys = sorted({float(p[1]) for p in points})
        if len(xs) != 2 or len(ys) != 2 or not all(map(math.isfinite, xs + ys)):
            return None
        return xs[0], xs[1], ys[0], ys[1]

    def segment(points):
        """(x0, y0, x1, y1) of a two-point line."""
        if len(points) != 2:
            return None
        (x0, y0), (x1, y1) = points
        return float(x0), float(y0), float(x1), float(y1)

    def no_line(artist):
        return str(artist.get_linestyle()).lower() in ("none", "", " ")

    def box_chart(ax, title):
        """Box plots, recognised from the artists Axes.boxplot draws: a rectangle per box
        (a Line2D, or a PathPatch with patch_artist=True), a median segment inside it,
        whisker segments from its edges, and marker-only flier lines."""
        from matplotlib.patches import PathPatch

        boxes = []
        for line in ax.lines:
            rect = is_rectangle([tuple(p) for p in line.get_xydata()])
            if rect:
                boxes.append(rect)
        for patch in ax.patches:
            if isinstance(patch, PathPatch) and patch.get_transform() == ax.transData:
                rect = is_rectangle([tuple(p) for p in patch.get_path().vertices])
                if rect:
                    boxes.append(rect)
        if not boxes:
            return None
        segments = [(line, segment([tuple(p) for p in line.get_xydata()])) for line in ax.lines]
        segments = [(line, s) for line, s in segments if s and not no_line(line)]
        fliers = [line for line in ax.lines if no_line(line) and line.get_marker() not in (None, "None", "none", "")]

        def measure(vertical):
            # In the box's own frame: `a` across the box (category axis), `b` along it (values).
            elements = []
            for x0, x1, y0, y1 in boxes:
                (a0, a1, b0, b1) = (x0, x1, y0, y1) if vertical else (y0, y1, x0, x1)
                center = (a0 + a1) / 2
                median = whisker_low = whisker_high = None
                for _, (sx0, sy0, sx1, sy1) in segments:
                    (p0, q0, p1, q1) = (sx0, sy0, sx1, sy1) if vertical else (sy0, sx0, sy1, sx1)
                    if close(q0, q1) and b0 <= q0 <= b1 and min(p0, p1) >= a0 - 1e-9 and max(p0, p1) <= a1 + 1e-9 and not close(p0, p1):
                        if median is None:
                            median = q0
                    elif close(p0, p1) and close(p0, center) and not close(q0, q1):
                        low, high = min(q0, q1), max(q0, q1)
                        if close(high, b0):
                            whisker_low = low
                        elif close(low, b1):
                            whisker_high = high
                if median is None:
                    return None
                outliers = []
                for line in fliers:
                    points = line.get_xydata()
                    across = [float(p[0] if vertical else p[1]) for p in points]
                    if across and all(close(v, center) for v in across):
                        outliers.extend(float(p[1] if vertical else p[0]) for p in points)
                axis = ax.xaxis if vertical else ax.yaxis
                elements.append(
                    (
                        center,
                        {
                            "label": tick_label_near(axis, center),
                            "min": jsonable(b0 if whisker_low is None else whisker_low),
                            "first_quartile": jsonable(b0),
                            "median": jsonable(median),
                            "third_quartile": jsonable(b1),
                            "max": jsonable(b1 if whisker_high is None else whisker_high),
                            "outliers": [jsonable(v) for v in outliers],
                        },
                    )
                )
            return [element for _, element in sorted(elements, key=lambda e: e[0])]

        elements = measure(True)
        if elements is None:
            elements = measure(False)
        if elements is None:
            return None
        return {"type": "box_and_whisker", "title": title, **axes_labels(ax), "elements": elements}

    def bar_chart(ax, title):
        from matplotlib.container import BarContainer

        containers = [c for c in ax.containers if isinstance(c, BarContainer)]
        if not containers:
            return None
        elements = []
        for container in containers:
            group = legend_label(container.get_label())
            horizontal = getattr(container, "orientation", None) == "horizontal"
            values = getattr(container, "datavalues", None)
            for index, rect in enumerate(container.patches):
                if horizontal:
                    center, value, axis = rect.get_y() + rect.get_height() / 2, rect.get_width(), ax.yaxis
                else:
                    center, value, axis = rect.get_x() + rect.get_width() / 2, rect.get_height(), ax.xaxis
                if values is not None and index < len(values):
                    value = values[index]
                elements.append(
                    {"label": tick_label_near(axis, center), "group": group, "value": jsonable(value)}
                )
        return {"type": "bar", "title": title, **axes_labels(ax), "elements": elements}

    def point_chart(ax, title):
        from matplotlib.collections import PathCollection

        lines = [line for line in ax.lines if len(line.get_xydata())]
        scatters = [c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())]
        if not lines and not scatters:
            return None
        x_scale, y_scale = scale_of(ax.xaxis), scale_of(ax.yaxis)

        def points(xs, ys):
            return [
                [coordinate(x, x_scale, ax.xaxis), coordinate(y, y_scale, ax.yaxis)]
                for x, y in zip(xs, ys)
            ]

        elements = []
        for line in lines:
            data = line.get_xydata()
            elements.append({"label": legend_label(line.get_label()), "points": points(data[:, 0], data[:, 1])})
        for collection in scatters:
            offsets = collection.get_offsets()
            elements.append(
                {"label": legend_label(collection.get_label()), "points": points(offsets[:, 0], offsets[:, 1])}
            )
        x_ticks, x_tick_labels = ticks(ax.xaxis, x_scale)
        y_ticks, y_tick_labels = ticks(ax.yaxis, y_scale)
        return {
            "type": "line" if lines else "scatter",
            "title": title,
            **axes_labels(ax),
            "x_ticks": x_ticks,
            "x_tick_labels": x_tick_labels,
            "x_scale": x_scale,
            "y_ticks": y_ticks,
            "y_tick_labels": y_tick_labels,
            "y_scale": y_scale,
            "elements": elements,
        }

    def axes_chart(ax):
        title = ax.get_title() or ax.get_title("left") or ax.get_title("right") or None
        for detect in (pie_chart, box_chart, bar_chart, point_chart):
            chart = detect(ax, title)
            if chart is not None:
                return chart
        return {"type": "unknown", "title": title, "elements": []}

    def figure_chart(figure):
        axes = [ax for ax in figure.get_axes() if ax.get_visible() and ax.get_label() != "<colorbar>"]
        if not axes:
            return None
        # Tick labels only exist once the figure has been laid out.
        try:
            figure.draw_without_rendering()
        except Exception:
            figure.canvas.draw()
        charts = [axes_chart(ax) for ax in axes]
        if len(charts) == 1:
            return charts[0]
        if hasattr(figure, "get_suptitle"):
            suptitle = figure.get_suptitle()
        else:
            suptitle = figure._suptitle.get_text() if getattr(figure, "_suptitle", None) else ""
        return {"type": "superchart", "title": suptitle or None, "elements": charts}

    # ----------------------------------------------------------------------------------
    # Formatters

    def add_formatter(mime, print_method):
        cls = type(
            "SoulboxFormatter",
            (BaseFormatter,),
            {
                "format_type": Unicode(mime),
                "print_method": ObjectName(print_method),
                "_return_type": (dict,),
            },
        )
        ip.display_formatter.formatters[mime] = cls(parent=ip.display_formatter)

    add_formatter("e2b/data", "_repr_e2b_data_")
    add_formatter("e2b/chart", "_repr_e2b_chart_")

    # The classes get `_repr_e2b_*_` methods when their modules load, rather than printers
    # registered by type name: IPython's select_figure_formats() (run when the inline backend
    # loads) drops every printer for Figure, and pandas 3 reports DataFrame's module as
    # "pandas", not where it is defined.
    def add_method(cls_name, method, function):
        function = quietly(function)

        def patch(module):
            setattr(getattr(module, cls_name), method, lambda self: function(self))

        return patch

    # ----------------------------------------------------------------------------------
    # PIL: there is no screen, so show() displays the image; save() to a path does too.

    def patch_pil(image_module):
        from IPython.display import display

        cls = image_module.Image
        original_save = cls.save

        def show(self, title=None, **options):
            display(self)

        def save(self, fp, format=None, **params):
            result = original_save(self, fp, format, **params)
            if isinstance(fp, (str, os.PathLike)):
                display(self)
            return result

        cls.show = show
        cls.save = save

    class AfterImport(importlib.abc.MetaPathFinder):
        """Runs a hook right after a module is first imported, without importing it now."""

        def __init__(self, hooks):
            self.hooks = hooks

        def find_spec(self, name, path, target=None):
            if name not in self.hooks:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = HookedLoader(spec.loader, self.hooks.pop(name))
            return spec

    class HookedLoader(importlib.abc.Loader):
        def __init__(self, inner, hook):
            self.inner = inner
            self.hook = hook

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            self.inner.exec_module(module)
            try:
                self.hook(module)
            except Exception:
                pass

        def __getattr__(self, name):
            return getattr(self.inner, name)

    hooks = {
        "pandas.core.frame": add_method("DataFrame", "_repr_e2b_data_", dataframe_data),
        "matplotlib.figure": add_method("Figure", "_repr_e2b_chart_", figure_chart),
        "PIL.Image": patch_pil,
    }
    for name in [name for name in hooks if name in sys.modules]:
        hooks.pop(name)(sys.modules[name])
    if hooks:
        sys.meta_path.insert(0, AfterImport(hooks))


__soulbox_startup()
del __soulbox_startup
