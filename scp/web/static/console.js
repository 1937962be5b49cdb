// Every form with data-confirm asks first (no inline handlers: the CSP allows scripts from here only).
document.addEventListener("submit", function (event) {
  const form = event.target;
  const question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
// "Select all" boxes on the deliveries page.
document.addEventListener("change", function (event) {
  const box = event.target;
  if (box.matches("input[data-select-all]")) {
    document.querySelectorAll("input[name=id]").forEach(function (other) { other.checked = box.checked; });
  }
});
