// Typeset the formulas that pymdownx.arithmatex (generic mode) wraps in
// <span class="arithmatex">\(...\)</span> and <div class="arithmatex">\[...\]</div>.
// Runs on every page load, including Material's instant navigation.
document$.subscribe(({ body }) => {
  body.querySelectorAll(".arithmatex").forEach((el) => {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  });
});
